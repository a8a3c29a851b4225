"""Drawing an architecture diagram (``cnnscope.features.architecture``) as SVG or PNG: boxes top to
bottom joined by arrows, no Graphviz. SVG is written by hand; PNG is drawn with matplotlib."""

from __future__ import annotations

from html import escape

BOX_W, BOX_H, GAP, MARGIN = 420, 46, 22, 20


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(str(s) for s in shape) if shape else "-"


def _params(count: int) -> str:
    if count >= 1_000_000:
        return f"{count / 1e6:.2f} M params"
    if count >= 1_000:
        return f"{count / 1e3:.1f} k params"
    return f"{count} params" if count else ""


def _rows(diagram) -> list[tuple[str, str, str, str]]:
    """(title, kind, shape, params) per box, input and output included."""
    rows = [("input", "image", _shape(diagram.input_shape), "")]
    for node in diagram.nodes:
        rows.append((node.title, node.label, _shape(node.output_shape), _params(node.params)))
    return rows


def diagram_svg(diagram) -> str:
    rows = _rows(diagram)
    height = MARGIN * 2 + 40 + len(rows) * BOX_H + (len(rows) - 1) * GAP
    width = BOX_W + 2 * MARGIN
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
        '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="4" refY="4" orient="auto">'
        '<path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 14}" font-size="14" font-weight="bold">{escape(diagram.model)}</text>',
        f'<text x="{MARGIN}" y="{MARGIN + 30}" font-size="11" fill="#444">{diagram.layers} module calls, '
        f"{escape(_params(diagram.total_params))}</text>",
    ]
    top = MARGIN + 40
    for index, (title, kind, shape, params) in enumerate(rows):
        y = top + index * (BOX_H + GAP)
        fill = "#eef3fb" if index else "#f3f3f3"
        parts.append(
            f'<rect x="{MARGIN}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}" stroke="#4c72b0"/>'
        )
        parts.append(f'<text x="{MARGIN + 10}" y="{y + 18}" font-size="12" font-weight="bold">{escape(kind)}</text>')
        parts.append(f'<text x="{MARGIN + 10}" y="{y + 36}" font-size="11" fill="#333">{escape(title)}</text>')
        parts.append(
            f'<text x="{MARGIN + BOX_W - 10}" y="{y + 18}" font-size="11" text-anchor="end">{escape(shape)}</text>'
        )
        parts.append(
            f'<text x="{MARGIN + BOX_W - 10}" y="{y + 36}" font-size="10" fill="#666" '
            f'text-anchor="end">{escape(params)}</text>'
        )
        if index:
            x = MARGIN + BOX_W // 2
            parts.append(
                f'<line x1="{x}" y1="{y - GAP}" x2="{x}" y2="{y - 3}" stroke="#555" marker-end="url(#arrow)"/>'
            )
    parts.append("</svg>")
    return "\n".join(parts)


def diagram_png(diagram, dpi: int = 100) -> bytes:
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    from .figure import figure_png

    rows = _rows(diagram)
    height_units = len(rows) * (BOX_H + GAP) + 40
    fig = Figure(figsize=(5.2, height_units / 72))
    axis = fig.add_axes((0, 0, 1, 1))
    axis.set_xlim(0, BOX_W + 2 * MARGIN)
    axis.set_ylim(height_units + MARGIN, 0)
    axis.set_axis_off()
    axis.text(MARGIN, 16, diagram.model, fontsize=11, fontweight="bold", va="center")
    axis.text(MARGIN, 32, f"{diagram.layers} module calls, {_params(diagram.total_params)}", fontsize=8, va="center")
    top = 44
    for index, (title, kind, shape, params) in enumerate(rows):
        y = top + index * (BOX_H + GAP)
        axis.add_patch(
            FancyBboxPatch(
                (MARGIN, y),
                BOX_W,
                BOX_H,
                boxstyle="round,pad=0,rounding_size=6",
                facecolor="#eef3fb" if index else "#f3f3f3",
                edgecolor="#4c72b0",
            )
        )
        axis.text(MARGIN + 10, y + 16, kind, fontsize=8, fontweight="bold", va="center")
        axis.text(MARGIN + 10, y + 34, title, fontsize=7, va="center")
        axis.text(MARGIN + BOX_W - 10, y + 16, shape, fontsize=7, va="center", ha="right")
        axis.text(MARGIN + BOX_W - 10, y + 34, params, fontsize=7, va="center", ha="right", color="#666")
        if index:
            x = MARGIN + BOX_W / 2
            axis.add_patch(FancyArrowPatch((x, y - GAP), (x, y), arrowstyle="-|>", mutation_scale=10, color="#555"))
    return figure_png(fig, dpi=dpi)
