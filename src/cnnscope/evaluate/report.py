"""The evaluation's self-contained HTML report: the method x metric table (mean and spread over images,
baselines beside it, cells no better than a random map marked), the mean curves, and the sanity check's
curves per randomization stage. Images inlined; it opens from disk with no server."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..io import write_atomically
from ..render.evaluation import curves_figure, sanity_figure
from ..render.figure import figure_png
from .run import METRICS, Evaluation

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:21px} h2{font-size:17px;margin:26px 0 8px} .meta{color:#555;font-size:13px;margin-bottom:14px}
table{border-collapse:collapse;font-size:13px;background:#fff} td,th{border:1px solid #ddd;padding:4px 7px}
th{background:#f0f0f0} td.num{text-align:right} td.weak{background:#fdecea;color:#b00020} tr.baseline td{color:#666;
font-style:italic} small{color:#666} img{max-width:100%;background:#fff;border:1px solid #ddd;border-radius:6px}
"""

TITLES = {
    "pointing_game": "pointing game ↑",
    "energy_pointing_game": "energy in object ↑",
    "deletion_auc": "deletion AUC ↓",
    "insertion_auc": "insertion AUC ↑",
    "road_morf": "ROAD MoRF ↓",
    "road_lerf": "ROAD LeRF ↑",
    "gini": "Gini (sparsity)",
    "constant_fraction": "constant maps ↓",
}


def _png(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(figure_png(fig, dpi=90)).decode()


def _cell(value, spread, weak: bool) -> str:
    if value is None:
        return '<td class="num">–</td>'
    text = f"{value:.3f}" + (f" <small>± {spread:.3f}</small>" if spread else "")
    return f'<td class="num{" weak" if weak else ""}">{text}</td>'


def render(evaluation: Evaluation, *, model=None) -> str:
    data = evaluation.to_json()
    settings = data["settings"]
    rows = []
    header = "".join(f"<th>{html.escape(TITLES[m])}</th>" for m in METRICS)
    has_sanity = any(m.get("sanity") for m in data["methods"])
    header += "<th>rank corr. after full randomization ↓</th>" if has_sanity else ""
    for entry in data["methods"]:
        weak = set(entry["not_better_than_random"])
        cells = "".join(_cell(entry["metrics"][m], entry["spread"][m], m in weak) for m in METRICS)
        if has_sanity:
            sanity = entry.get("sanity") or []
            cells += f'<td class="num">{sanity[-1]["spearman_abs"]:.3f}</td>' if sanity else "<td>–</td>"
        rows.append(f"<tr><td>{html.escape(entry['name'])}</td>{cells}</tr>")
    for name, entry in data["baselines"].items():
        cells = "".join(_cell(entry["metrics"][m], entry["spread"][m], False) for m in METRICS)
        cells += "<td>–</td>" if has_sanity else ""
        rows.append(f'<tr class="baseline"><td>({html.escape(name)} map)</td>{cells}</tr>')
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cnnscope evaluation</title>",
        f"<style>{_STYLE}</style></head><body><h1>Which method can this model's maps be trusted with?</h1>",
        f"<div class='meta'><b>{data['images']}</b> image(s) · {html.escape(str(settings.get('data', '')))}"
        + (f" · model <b>{html.escape(model.name)}</b>" if model is not None else "")
        + f" · targets: {html.escape(settings['target'])} · {settings['with_masks']} with object masks or boxes"
        + f" · pointing tolerance {settings['tolerance_px']} px · {data['seconds']:.1f} s"
        + ("" if data["complete"] else " · <b>stopped early</b> (max seconds): the table covers what was scored")
        + "</div>",
        "<h2>Metrics (mean ± spread over images)</h2>",
        "<p><small>Red cells are no better than a per-pixel random map. Energy in object and Gini are measured "
        "offset-free (an unsigned map minus its minimum, the positive part of a signed one), so RISE's constant "
        "offset does not count as mass. Deletion fills with black, insertion starts from a blurred copy; ROAD "
        "fills by noisy linear imputation, which does not leak the removed region's shape.</small></p>",
        f"<table><tr><th>method</th>{header}</tr>{''.join(rows)}</table>",
        "<h2>Mean curves</h2>",
        f"<img alt='curves' src='{_png(curves_figure(evaluation.curves, settings['road_fractions']))}'>",
    ]
    for key, title in (("sanity", "Cascading randomization"), ("sanity_independent", "Independent randomization")):
        fig = sanity_figure(data["methods"], key=key)
        if fig is not None:
            parts.append(
                f"<h2>Sanity check: {title}</h2><p><small>Similarity of each method's map to the trained model's "
                "as the weights are re-initialized stage by stage from the head down (Adebayo et al. 2018). A map "
                "that stays similar to the end shows the image, not what the model learned.</small></p>"
                f"<img alt='{title}' src='{_png(fig)}'>"
            )
    left_out = [{"reason": f"{m['name']}: {m['reason']}"} for m in data["failed_methods"]]
    if data["skipped"] or data["problems"] or left_out:
        items = "".join(
            f"<li>{html.escape(p['reason'])}</li>" for p in [*left_out, *data["skipped"], *data["problems"]]
        )
        parts.append(f"<h2>Skipped and problems</h2><ul>{items}</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(evaluation: Evaluation, path: str | Path, *, model=None) -> Path:
    """Write :func:`render` to ``path`` (atomically) and return the path."""
    target = Path(path)
    write_atomically(target, render(evaluation, model=model).encode())
    return target
