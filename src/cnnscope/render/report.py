"""One self-contained HTML report (images inlined as base64 PNG); opens from disk with no server."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .overlay import png_bytes


@dataclass(frozen=True)
class ReportRow:
    """One image: the photo, its top predictions and any number of captioned overlays."""

    name: str
    image: np.ndarray
    top: Sequence[tuple[str, float]]
    overlays: Sequence[tuple[str, np.ndarray]]


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px} .meta{color:#666;font-size:13px;margin-bottom:18px}
.row{display:flex;gap:14px;align-items:flex-start;background:#fff;border:1px solid #ddd;border-radius:8px;
padding:12px;margin-bottom:16px;flex-wrap:wrap}
figure{margin:0;text-align:center;font-size:12px} figure img{display:block;height:200px;border-radius:4px}
.bars{min-width:260px;font-size:12px} .bars h3{font-size:13px;margin:0 0 6px}
.bar{display:flex;align-items:center;gap:6px;margin:3px 0} .bar .label{width:120px;text-align:right;
overflow:hidden;text-overflow:ellipsis;white-space:nowrap} .bar .track{flex:1;background:#eee;height:14px;
border-radius:3px} .bar .fill{background:#4c72b0;height:14px;border-radius:3px} .bar .p{width:48px}
"""


def _img_tag(image: np.ndarray, alt: str, max_side: int = 400) -> str:
    height, width = image.shape[:2]
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        image = np.asarray(Image.fromarray(image).resize((max(1, round(width * scale)), max(1, round(height * scale)))))
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_report(rows: Sequence[ReportRow], *, title: str = "cnnscope report", meta: str = "") -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><div class='meta'>{html.escape(meta)}</div>",
    ]
    for row in rows:
        parts.append(
            f"<section class='row'><figure>{_img_tag(row.image, row.name)}"
            f"<figcaption>{html.escape(row.name)}</figcaption></figure>"
        )
        for caption, picture in row.overlays:
            parts.append(
                f"<figure>{_img_tag(picture, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("<div class='bars'><h3>top predictions</h3>")
        for label, probability in row.top:
            width = max(0.0, min(100.0, probability * 100.0))
            parts.append(
                f"<div class='bar'><span class='label' title='{html.escape(label)}'>{html.escape(label)}</span>"
                f"<span class='track'><span class='fill' style='display:block;width:{width:.1f}%'></span></span>"
                f"<span class='p'>{probability:.1%}</span></div>"
            )
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(path: str | Path, rows: Sequence[ReportRow], **kwargs) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_report(rows, **kwargs), encoding="utf-8")
    return target
