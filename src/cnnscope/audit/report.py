"""The audit's one self-contained HTML report (images inlined, opens from disk with no server).

Sections: the summary (what was audited, how many images, skipped and problems), the feature embedding (the
interactive scatter of :mod:`cnnscope.render.scatter` in an inline frame, the only part with a script, its
static PNG, the neighbourhood purity per class and the classes the features confuse: computed from the stored
features, no image read again), the classes with flags
first (reasons and evidence, mean and variance maps, SpRAy clusters with their mean maps and examples, the
good / bad / ugly galleries), the confusion matrix whose cells open the galleries of their images (CSS
``:target``, no JavaScript), then the other classes.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..render.colormaps import colorize
from ..render.overlay import overlay, resize_map

#: At most this many classes get a full section (flagged ones first, then the least accurate).
MAX_SECTIONS = 40
#: A confusion matrix with more rows or columns than this is shown as a list of its largest cells.
MAX_MATRIX = 30
#: Images per confusion-cell gallery, and cells with a gallery.
CELL_GALLERY = 6
MAX_CELLS = 200
TILE = 112

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:21px} h2{font-size:17px;margin:26px 0 8px} h3{font-size:14px;margin:14px 0 6px}
.meta{color:#555;font-size:13px;margin-bottom:14px} .meta b{color:#222}
table{border-collapse:collapse;font-size:13px;background:#fff} td,th{border:1px solid #ddd;padding:4px 7px}
th{background:#f0f0f0} td.num{text-align:right} .flagged{color:#b00020;font-weight:600}
.class{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin:14px 0}
.class.has-flags{border-left:5px solid #b00020} .flag{margin:4px 0;font-size:13px}
.flag .kind{display:inline-block;background:#b00020;color:#fff;border-radius:3px;padding:0 6px;margin-right:6px;
font-size:12px} .ok{color:#2e7d32;font-size:13px}
.tiles{display:flex;gap:8px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0;text-align:center;font-size:11px;max-width:124px;overflow-wrap:anywhere}
figure img{display:block;width:112px;height:112px;object-fit:contain;border-radius:3px;background:#eee}
.cluster{border:1px dashed #bbb;border-radius:6px;padding:6px;margin:6px 0}
.matrix td a{display:block;color:inherit;text-decoration:none} .matrix td.diag{background:#e8f5e9}
.matrix td.off{background:#fff3e0} .cell{display:none;background:#fff;border:1px solid #ccc;border-radius:8px;
padding:10px;margin:10px 0} .cell:target{display:block} small{color:#666}
"""


def _uri(picture: np.ndarray, kind: str = "JPEG") -> str:
    buffer = io.BytesIO()
    image = Image.fromarray(picture)
    if kind == "JPEG":
        image.save(buffer, format="JPEG", quality=88)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _figure(picture: np.ndarray, caption: str, kind: str = "JPEG") -> str:
    text = html.escape(caption)
    return f'<figure><img alt="{text}" src="{_uri(picture, kind)}"><figcaption>{text}</figcaption></figure>'


def heat_picture(values: np.ndarray, side: int = TILE) -> np.ndarray:
    """A map as a coloured square (jet, scaled to its maximum)."""
    top = float(values.max()) if values.size else 0.0
    scaled = np.clip(values / top, 0, 1) if top > 0 else np.zeros_like(values)
    return colorize(resize_map(scaled, side, side), "jet")


def _decode(thumbnail: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(thumbnail)) as picture:
        return np.asarray(picture.convert("RGB"))


def overlay_picture(thumbnail: bytes, values: np.ndarray) -> np.ndarray:
    """The stored map over the stored thumbnail, enlarged to a tile."""
    image = _decode(thumbnail)
    height, width = image.shape[:2]
    scale = TILE / max(height, width)
    image = np.asarray(Image.fromarray(image).resize((max(1, round(width * scale)), max(1, round(height * scale)))))
    positive = np.clip(values, 0, None)
    top = float(positive.max())
    return overlay(image, positive / top if top > 0 else positive, alpha=0.45)


def _wanted(result) -> set[int]:
    """Positions whose pictures the class sections show."""
    positions: set[int] = set()
    for report in _sections(result):
        for members in report.galleries.values():
            positions.update(members)
        for cluster in report.clusters:
            positions.update(cluster.examples)
    return positions


def _sections(result) -> list:
    flagged = [r for r in result.classes if r.flags]
    rest = sorted((r for r in result.classes if not r.flags), key=lambda r: (r.accuracy, r.index))
    return (flagged + rest)[:MAX_SECTIONS]


def _cells(store, result) -> dict[tuple[int, int], list[int]]:
    """For each confusion cell (true, predicted), the most confident images (up to CELL_GALLERY)."""
    best: dict[tuple[int, int], list[tuple[float, int]]] = {}
    for table in store.batches(["position", "label", "predicted", "probability"]):
        columns = table.to_pydict()
        for position, label, predicted, probability in zip(
            columns["position"], columns["label"], columns["predicted"], columns["probability"], strict=True
        ):
            cell = best.setdefault((label, predicted), [])
            cell.append((-(probability or 0.0), position))
            if len(cell) > 4 * CELL_GALLERY:
                cell.sort()
                del cell[CELL_GALLERY:]
    ranked = sorted(best, key=lambda key: (key[0] == key[1], -len(best[key])))[:MAX_CELLS]
    return {key: [p for _, p in sorted(best[key])[:CELL_GALLERY]] for key in ranked}


def _pictures(store, positions: set[int]) -> dict[int, dict]:
    import pyarrow.compute as pc

    found: dict[int, dict] = {}
    if not positions:
        return found
    wanted = sorted(positions)
    import pyarrow as pa

    for table in store.batches(
        ["position", "key", "label", "predicted", "probability", "thumbnail", "map_true", "map_pred"]
    ):
        chosen = table.filter(pc.is_in(table.column("position"), value_set=pa.array(wanted, type=pa.int64())))
        for row in chosen.to_pylist():
            found[row["position"]] = row
    return found


def _tile(row: dict, which: str, map_size: int, labels, caption: str | None = None) -> str:
    values = np.asarray(row[f"map_{which}"], dtype=np.float32).reshape(map_size, map_size)
    name = Path(row["key"]).name
    guess = labels[row["predicted"]].split(",")[0]
    text = caption or f"{name} · {guess} {row['probability']:.0%}"
    return _figure(overlay_picture(row["thumbnail"], values), text)


def _class_section(report, pictures: dict, map_size: int, labels) -> str:
    anchor = f"class-{report.index}"
    parts = [f"<section class='class{' has-flags' if report.flags else ''}' id='{anchor}'>"]
    folder = (
        f" <small>(folder '{html.escape(report.dataset_name)}')</small>" if report.dataset_name != report.name else ""
    )
    parts.append(
        f"<h2>{html.escape(report.name)}{folder} — {report.images} images, accuracy {report.accuracy:.1%}</h2>"
    )
    if report.flags:
        for flag in report.flags:
            parts.append(
                f"<div class='flag'><span class='kind'>{html.escape(flag.kind)}</span>{html.escape(flag.reason)}</div>"
            )
    else:
        parts.append("<div class='ok'>no flag</div>")
    metrics = report.metrics()
    shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in metrics.items() if v is not None)
    parts.append(f"<div class='meta'>{html.escape(shown)}</div><div class='tiles'>")
    parts.append(_figure(heat_picture(report.mean_map), "mean map (true class)", "PNG"))
    parts.append(_figure(heat_picture(report.variance_map), "variance", "PNG"))
    parts.append("</div>")
    if report.clusters:
        count = len(report.clusters)
        gap = f", eigengap {report.spray.gap:.3f}" if report.spray is not None and report.spray.eigenvalues.size else ""
        parts.append(f"<h3>SpRAy: {count} cluster{'s' if count > 1 else ''}{gap}</h3>")
        for cluster in report.clusters:
            inside = f", {cluster.inside:.0%} on the object" if cluster.inside is not None else ""
            parts.append(
                f"<div class='cluster'><small>cluster {cluster.index}: {cluster.size} images ({cluster.share:.0%}), "
                f"peak at the {cluster.peak_region}{inside}, distance to the main cluster "
                f"{cluster.distance:.2f}</small>"
                "<div class='tiles'>"
            )
            parts.append(_figure(heat_picture(cluster.mean_map), f"cluster {cluster.index} mean", "PNG"))
            for position in cluster.examples:
                if position in pictures:
                    parts.append(_tile(pictures[position], "true", map_size, labels))
            parts.append("</div></div>")
    for name, which, help_text in (
        ("good", "true", "right, and looking at the object (or with the class's main strategy)"),
        ("bad", "pred", "wrong: the map of the class it chose"),
        ("ugly", "true", "right, but looking elsewhere"),
    ):
        members = [p for p in report.galleries.get(name, []) if p in pictures]
        parts.append(f"<h3>{name} <small>{help_text}</small></h3>")
        if not members:
            parts.append("<small>none</small>")
            continue
        parts.append("<div class='tiles'>")
        parts.extend(_tile(pictures[p], which, map_size, labels) for p in members)
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def _matrix(result, cells: dict, pictures: dict, map_size: int) -> str:
    labels = result.labels
    rows = [r.index for r in result.classes]
    columns = sorted({k for r in result.classes for k in r.confusion})
    parts = ["<h2 id='confusion'>Confusion</h2>"]
    if len(rows) <= MAX_MATRIX and len(columns) <= MAX_MATRIX:
        parts.append("<table class='matrix'><tr><th>true \\ predicted</th>")
        parts.extend(f"<th>{html.escape(labels[c].split(',')[0])}</th>" for c in columns)
        parts.append("</tr>")
        for report in result.classes:
            parts.append(f"<tr><th>{html.escape(report.name)}</th>")
            for column in columns:
                count = report.confusion.get(column, 0)
                kind = "diag" if column == report.index else ("off" if count else "")
                link = (
                    f"<a href='#cell-{report.index}-{column}'>{count}</a>"
                    if count and (report.index, column) in cells
                    else str(count or "")
                )
                parts.append(f"<td class='num {kind}'>{link}</td>")
            parts.append("</tr>")
        parts.append("</table><small>click a cell for its images</small>")
    else:
        parts.append("<table><tr><th>true</th><th>predicted</th><th>images</th></tr>")
        for true, predicted in list(cells)[:MAX_CELLS]:
            if true == predicted:
                continue
            count = next(r.confusion.get(predicted, 0) for r in result.classes if r.index == true)
            parts.append(
                f"<tr><td>{html.escape(labels[true].split(',')[0])}</td><td>{html.escape(labels[predicted].split(',')[0])}"
                f"</td><td class='num'><a href='#cell-{true}-{predicted}'>{count}</a></td></tr>"
            )
        parts.append("</table>")
    for (true, predicted), members in cells.items():
        which = "true" if true == predicted else "pred"
        title = (
            f"{labels[true].split(',')[0]}: right (map of the true class)"
            if true == predicted
            else f"{labels[true].split(',')[0]} taken for {labels[predicted].split(',')[0]} (map of the class it chose)"
        )
        tiles = "".join(_tile(pictures[p], which, map_size, labels) for p in members if p in pictures)
        parts.append(
            f"<div class='cell' id='cell-{true}-{predicted}'><h3>{html.escape(title)}</h3>"
            f"<div class='tiles'>{tiles}</div></div>"
        )
    return "".join(parts)


def render(result, store, map_size: int) -> str:
    sections = _sections(result)
    positions = _wanted(result)
    cells = _cells(store, result)
    for members in cells.values():
        positions.update(members)
    pictures = _pictures(store, positions)
    method = result.method
    layer = f" at {method['layer']}" if method.get("layer") else ""
    flagged = result.flagged()
    summary = (
        f"<b>{result.images}</b> images audited with <b>{html.escape(method['name'])}</b>{html.escape(layer)} on "
        f"<b>{html.escape(result.model)}</b>; {len(result.classes)} classes, <b>{len(flagged)}</b> flagged; "
        f"{len(result.skipped)} skipped, {len(result.problems)} problems"
        + ("" if result.complete else " — <b>incomplete</b> (resume with the same command)")
    )
    demo = result.extra.get("demo")
    if demo:
        cue = f"a {demo['cue']} cue on '{demo['cued_class']}'" if demo["cue"] else "no cue"
        summary += (
            f"<br>demo: shapes with {html.escape(cue)}, seed {demo['seed']}; small CNN, test accuracy "
            f"{demo['test_accuracy']:.1%}"
        )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cnnscope audit</title>",
        f"<style>{_STYLE}</style></head><body><h1>cnnscope audit</h1><div class='meta'>{summary}</div>",
        "<h2>Classes</h2><table><tr><th>class</th><th>images</th><th>accuracy</th><th>flags</th><th>mean map</th></tr>",
    ]
    for report in flagged + [r for r in result.classes if not r.flags]:
        kinds = ", ".join(flag.kind for flag in report.flags) or "—"
        mean = f"<img alt='' style='width:40px;height:40px' src='{_uri(heat_picture(report.mean_map, 40), 'PNG')}'>"
        name = html.escape(report.name)
        link = f"<a href='#class-{report.index}'>{name}</a>" if report in sections else name
        parts.append(
            f"<tr><td>{link}</td><td class='num'>{report.images}</td><td class='num'>{report.accuracy:.1%}</td>"
            f"<td class='{'flagged' if report.flags else ''}'>{html.escape(kinds)}</td><td>{mean}</td></tr>"
        )
    parts.append("</table>")
    parts.append(embedding_section(result, store, map_size))
    for report in sections:
        if report.flags:
            parts.append(_class_section(report, pictures, map_size, result.labels))
    parts.append(_matrix(result, cells, pictures, map_size))
    for report in sections:
        if not report.flags:
            parts.append(_class_section(report, pictures, map_size, result.labels))
    for title, items in (("Skipped images", result.skipped), ("Problems found", result.problems)):
        if items:
            parts.append(f"<h2>{title}</h2><ul>")
            parts.extend(f"<li>{html.escape(item['reason'])}</li>" for item in items[:500])
            if len(items) > 500:
                parts.append(f"<li>... and {len(items) - 500} more (manifest.json lists them all)</li>")
            parts.append("</ul>")
    parts.append("</body></html>")
    return "".join(parts)


#: Points with a thumbnail in the report's scatter (misclassified first), to keep the report's size sane.
REPORT_THUMBNAILS = 5_000


def embedding_section(result, store, map_size: int) -> str:
    """The feature embedding of the stored features: the interactive scatter (inline frame), its PNG, the
    purity per class and the most overlapping classes; a note instead when it cannot be computed."""
    from ..errors import InputError
    from ..render.scatter import scatter_html, scatter_png
    from .embedding import embed_store, report_method, scatter_data

    parts = ["<h2 id='embedding'>Feature embedding</h2>"]
    try:
        embedding = embed_store(store, result.labels, method=report_method(store.rows()))
    except InputError as exc:
        parts.append(f"<div class='meta'>no embedding: {html.escape(str(exc))}</div>")
        return "".join(parts)
    summary = embedding.summary()
    picture = scatter_data(store, embedding, map_size, result.classes, REPORT_THUMBNAILS)
    parts.append(
        f"<div class='meta'>{html.escape(summary['method'])} of the stored features of {summary['points']} images "
        f"(seed {summary['seed']}); neighbourhood purity <b>{summary['purity']:.2f}</b> (k={summary['k']}, "
        f"chance {summary['chance']:.2f}): the share of each image's nearest neighbours in feature space that "
        "share its class. Hover a point for its thumbnail and top-3, click it for its map; rings mark "
        "misclassified images.</div>"
    )
    frame = html.escape(scatter_html(picture), quote=True)
    parts.append(
        f"<iframe class='embedding' title='embedding scatter' srcdoc=\"{frame}\" "
        "style='width:100%;height:620px;border:1px solid #ddd;border-radius:8px;background:#fff'></iframe>"
    )
    buffer = io.BytesIO()
    scatter_png(picture, buffer, size=6.0, dpi=90)
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    parts.append(
        "<details><summary>static picture</summary>"
        f"<img alt='embedding' style='max-width:100%' src='data:image/png;base64,{png}'></details>"
    )
    parts.append("<table><tr><th>class</th><th>images</th><th>purity</th><th>accuracy</th><th>closest class</th></tr>")
    for entry in sorted(summary["classes"], key=lambda e: e["purity"]):
        nearest = entry["nearest_other"]
        near = f"{html.escape(nearest['name'])} ({nearest['share']:.0%})" if nearest else "—"
        parts.append(
            f"<tr><td>{html.escape(entry['name'])}</td><td class='num'>{entry['images']}</td>"
            f"<td class='num'>{entry['purity']:.2f}</td><td class='num'>{entry['accuracy']:.1%}</td>"
            f"<td>{near}</td></tr>"
        )
    parts.append("</table>")
    if summary["overlapping"]:
        parts.append("<h3>classes the features confuse most</h3><ul>")
        for pair in summary["overlapping"][:5]:
            parts.append(
                f"<li>{html.escape(pair['classes'][0])} / {html.escape(pair['classes'][1])}: overlap "
                f"{pair['overlap']:.2f}</li>"
            )
        parts.append("</ul>")
    return "".join(parts)


def write_report(result, store, map_size: int) -> Path:
    """Write ``OUT/report.html`` and return its path."""
    path = Path(result.out) / "report.html"
    temporary = path.with_name(".report.html.tmp")
    temporary.write_text(render(result, store, map_size), encoding="utf-8")
    temporary.replace(path)
    return path
