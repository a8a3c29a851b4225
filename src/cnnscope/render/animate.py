"""Movies of maps over time: frames with a caption and a bar chart, GIF (Pillow), MP4 (imageio + ffmpeg) and
a self-contained HTML page with a slider. Nothing here runs a model: callers hand over pictures and numbers.

A frame is one column: a header with the epoch number (large, left) and a title, the overlay, then the top-3
classes as horizontal bars with their probabilities (the true class's bar in green), then footer lines.
Frame sides are multiples of 16 (what H.264 encoders want), padded with white.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError

BACKGROUND = (255, 255, 255)
TEXT = (34, 34, 34)
MUTED = (110, 110, 110)
TRACK = (232, 232, 232)
BAR = (76, 114, 176)  # the bar colour of the report and the figures
TRUE_BAR = (85, 168, 104)
#: Side of the square box the picture is fitted in, in pixels (frames are this wide).
FRAME_WIDTH = 256
VIDEO_EXTRA = "MP4 movies need imageio and imageio-ffmpeg: pip install 'cnnscope[video]' (or leave MP4 out)"


@lru_cache(maxsize=8)
def _font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's own fonts (always installed with it), else Pillow's default."""
    try:
        from matplotlib import font_manager

        path = font_manager.findfont(
            font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal"),
            fallback_to_default=True,
        )
        return ImageFont.truetype(path, size)
    except Exception:  # no FreeType or no font file: the bitmap default still draws
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _round_up(value: int, multiple: int = 16) -> int:
    return int(math.ceil(value / multiple) * multiple)


def fit_picture(picture: np.ndarray, box: int = FRAME_WIDTH) -> Image.Image:
    """``picture`` scaled (up or down, keeping its aspect) so that its longer side is ``box`` pixels."""
    height, width = picture.shape[:2]
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(np.ascontiguousarray(picture[..., :3]).astype(np.uint8))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def movie_frame(
    picture: np.ndarray,
    *,
    epoch: int | str,
    top: Sequence[tuple[str, float, bool]],
    title: str = "",
    footer: str | Sequence[str] = "",
    width: int = FRAME_WIDTH,
) -> np.ndarray:
    """One frame: "epoch N" and ``title`` above ``picture`` (an overlay, RGB uint8), the ``top`` classes as
    bars under it (``(label, probability, is_true_class)``, drawn in order) and ``footer`` below (a line, or
    a list of lines).

    Returns an (H, W, 3) uint8 array with W = ``width`` rounded up to a multiple of 16, and H a multiple of 16.
    """
    width = _round_up(max(width, 128))
    header, row, pad = 30, 21, 8
    fitted = fit_picture(picture, width)
    bars_top = header + fitted.height + pad
    footer_top = bars_top + row * len(top) + 2
    lines = [footer] if isinstance(footer, str) else list(footer)
    lines = [line for line in lines if line]
    height = _round_up(footer_top + 17 * len(lines) + 4)
    frame = Image.new("RGB", (width, height), BACKGROUND)
    frame.paste(fitted, ((width - fitted.width) // 2, header))
    draw = ImageDraw.Draw(frame)
    big, small = _font(18, bold=True), _font(12)
    label = f"epoch {epoch}" if isinstance(epoch, (int, np.integer)) else str(epoch)
    draw.text((6, 5), label, fill=TEXT, font=big)
    if title:
        left = 6 + _text_width(draw, label, big) + 10
        text = _fit(draw, title, small, width - left - 6)
        draw.text((width - 6 - _text_width(draw, text, small), 9), text, fill=MUTED, font=small)
    label_width, percent_width = 92, 46
    track_left, track_right = 6 + label_width, width - 6 - percent_width
    for position, (name, probability, is_true) in enumerate(top):
        y = bars_top + position * row
        probability = float(probability) if np.isfinite(probability) else 0.0
        draw.text((6, y + 2), _fit(draw, str(name), small, label_width - 6), fill=TEXT, font=small)
        draw.rectangle((track_left, y + 3, track_right, y + row - 4), fill=TRACK)
        filled = track_left + (track_right - track_left) * min(max(probability, 0.0), 1.0)
        if filled > track_left:
            draw.rectangle((track_left, y + 3, filled, y + row - 4), fill=TRUE_BAR if is_true else BAR)
        draw.text((track_right + 5, y + 2), f"{probability:.1%}", fill=TEXT, font=small)
    for position, line in enumerate(lines):
        draw.text((6, footer_top + 2 + 17 * position), _fit(draw, line, small, width - 12), fill=MUTED, font=small)
    return np.asarray(frame)


def side_by_side(frames: Sequence[np.ndarray], captions: Sequence[str] | None = None, gap: int = 16) -> np.ndarray:
    """Frames next to each other (tops aligned, white between), with an optional caption band above each;
    the result's sides are multiples of 16."""
    if not frames:
        raise InputError("side_by_side needs at least one frame")
    band = 24 if captions else 0
    width = sum(frame.shape[1] for frame in frames) + gap * (len(frames) - 1)
    height = band + max(frame.shape[0] for frame in frames)
    canvas = Image.new("RGB", (_round_up(width), _round_up(height)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(14, bold=True)
    left = 0
    for index, frame in enumerate(frames):
        canvas.paste(Image.fromarray(frame), (left, band))
        if captions:
            text = _fit(draw, captions[index], font, frame.shape[1] - 8)
            draw.text((left + (frame.shape[1] - _text_width(draw, text, font)) / 2, 4), text, fill=TEXT, font=font)
        left += frame.shape[1] + gap
    return np.asarray(canvas)


def _pad16(frame: np.ndarray) -> np.ndarray:
    height, width = frame.shape[:2]
    if height % 16 == 0 and width % 16 == 0:
        return frame
    padded = np.full((_round_up(height), _round_up(width), 3), 255, dtype=np.uint8)
    padded[:height, :width] = frame
    return padded


def _palette(frame: np.ndarray) -> Image.Image:
    """A frame in 256 colours of its own (fast octree: ~2 ms for a frame, where Pillow's default median cut
    takes ~180 ms; the mean error is 2.5 of 255 levels instead of 1.8)."""
    return Image.fromarray(np.ascontiguousarray(frame)).quantize(256, method=Image.Quantize.FASTOCTREE)


def write_gif(frames: Iterable[np.ndarray], path: str | os.PathLike, *, fps: float = 2.0, hold: float = 3.0) -> Path:
    """An endlessly looping GIF, ``fps`` frames per second, the last frame held ``hold`` times as long."""
    if not fps > 0:
        raise InputError(f"fps must be positive, got {fps}")
    pictures = [_palette(frame) for frame in frames]
    if not pictures:
        raise InputError("a movie needs at least one frame")
    duration = max(20, round(1000 / fps))
    durations = [duration] * len(pictures)
    durations[-1] = round(duration * max(hold, 1.0))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(
        target, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0, disposal=1
    )
    return target


def require_video():
    """``imageio`` with its ffmpeg binary (the ``video`` extra), or the one-line error saying how to get it."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401 (the ffmpeg binary imageio's FFMPEG plugin runs)
    except ImportError:
        raise InputError(VIDEO_EXTRA) from None
    return imageio


def video_available() -> bool:
    try:
        require_video()
    except InputError:
        return False
    return True


def write_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike, *, fps: float = 2.0, hold: int = 1) -> Path:
    """An H.264 MP4 (yuv420p, plays in browsers), ``fps`` frames per second; ``hold`` > 1 repeats the last
    frame to that many (the default 1: one video frame per frame given). Frames are streamed to ffmpeg one at
    a time. Needs the ``video`` extra."""
    imageio = require_video()
    if not fps > 0:
        raise InputError(f"fps must be positive, got {fps}")
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise InputError("a movie needs at least one frame")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio.get_writer(
        str(target),
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=16,
        ffmpeg_log_level="error",
    )
    try:
        last = _pad16(np.ascontiguousarray(first))
        writer.append_data(last)
        for frame in iterator:
            last = _pad16(np.ascontiguousarray(frame))
            writer.append_data(last)
        for _ in range(max(0, int(hold) - 1)):
            writer.append_data(last)
    finally:
        writer.close()
    return target


def focus_figure(
    epochs: Sequence[int],
    tracks: Sequence[tuple[str, Sequence[float]]],
    *,
    title: str = "share of the map on the object",
    bold: Sequence[str] = (),
) -> Figure:
    """Lines of (name, values per epoch) over ``epochs``, y from 0 to 1; the names in ``bold`` drawn thick."""
    fig = Figure(figsize=(6.0, 3.4), layout="constrained")
    axis = fig.subplots()
    for name, values in tracks:
        thick = name in bold
        axis.plot(
            list(epochs),
            [math.nan if v is None else float(v) for v in values],
            marker="o" if len(epochs) <= 30 else None,
            markersize=3,
            linewidth=2.6 if thick else 1.2,
            alpha=1.0 if thick or not bold else 0.55,
            label=name,
        )
    axis.set_ylim(0, 1)
    axis.set_xlabel("epoch")
    axis.set_ylabel("map mass on the object")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    if tracks:
        axis.legend(fontsize=7, ncol=2 if len(tracks) > 6 else 1, loc="best")
    return fig


_PAGE_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px} .meta{color:#666;font-size:13px;margin-bottom:14px}
.controls{position:sticky;top:0;background:#fafafa;padding:8px 0;display:flex;gap:12px;align-items:center;z-index:1}
.controls input[type=range]{width:min(600px,60vw)} #epoch{font-weight:600;min-width:90px}
.grid{display:flex;flex-wrap:wrap;gap:14px} figure{margin:0;text-align:center;font-size:12px;background:#fff;
border:1px solid #ddd;border-radius:8px;padding:6px} figure img{display:block}
.plots{margin-top:18px;display:flex;flex-wrap:wrap;gap:14px} .plots img{max-width:100%}
"""


def frame_uri(image: np.ndarray | bytes | str) -> str:
    """A frame (RGB uint8 array, or PNG bytes) as a ``data:image/png;base64,...`` URI; a URI stays as it is."""
    if isinstance(image, str):
        return image
    if isinstance(image, bytes):
        data = image
    else:
        buffer = io.BytesIO()  # in 256 colours of its own: a third of the bytes of a full-colour PNG
        _palette(image).save(buffer, format="PNG", compress_level=6)
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def slider_page(
    rows: Sequence[tuple[str, Sequence[np.ndarray | str]]],
    epochs: Sequence[int],
    *,
    title: str = "cnnscope: watching a model learn",
    meta: str = "",
    plots: Sequence[tuple[str, bytes]] = (),
) -> str:
    """One self-contained HTML page: a slider over ``epochs`` that moves every row's picture at once (each
    row: a name and one frame per epoch, as an array or a :func:`frame_uri`), a play button, and ``plots``
    (caption, PNG bytes) below."""
    if any(len(frames) != len(epochs) for _, frames in rows):
        raise InputError("every row of the page needs one frame per epoch")
    frames = [[frame_uri(frame) for frame in row_frames] for _, row_frames in rows]
    last = max(0, len(epochs) - 1)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><div class='meta'>{html.escape(meta)}</div>",
        "<div class='controls'><button id='play' type='button'>play</button>",
        f"<input id='slider' type='range' min='0' max='{last}' value='{last}' step='1' aria-label='epoch'>",
        f"<span id='epoch'>epoch {epochs[last] if epochs else ''}</span></div><div class='grid'>",
    ]
    for index, (name, _) in enumerate(rows):
        source = frames[index][last] if frames[index] else ""
        parts.append(
            f"<figure><img id='frame{index}' alt='{html.escape(name)}' src='{source}'>"
            f"<figcaption>{html.escape(name)}</figcaption></figure>"
        )
    parts.append("</div><div class='plots'>")
    for caption, png in plots:
        parts.append(
            f"<figure><img alt='{html.escape(caption)}' src='{frame_uri(png)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("</div><script>")
    parts.append(f"const FRAMES={json.dumps(frames)};const EPOCHS={json.dumps([int(e) for e in epochs])};")
    parts.append(
        "const slider=document.getElementById('slider'),label=document.getElementById('epoch'),"
        "play=document.getElementById('play');let timer=null;"
        "function show(i){slider.value=i;label.textContent='epoch '+EPOCHS[i];"
        "FRAMES.forEach((f,r)=>{document.getElementById('frame'+r).src=f[i];});}"
        "slider.addEventListener('input',()=>show(Number(slider.value)));"
        "play.addEventListener('click',()=>{if(timer){clearInterval(timer);timer=null;play.textContent='play';return;}"
        "play.textContent='pause';let i=Number(slider.value)>=EPOCHS.length-1?0:Number(slider.value);show(i);"
        "timer=setInterval(()=>{i+=1;if(i>=EPOCHS.length){clearInterval(timer);timer=null;play.textContent='play';"
        "return;}show(i);},500);});"
    )
    parts.append("</script></body></html>")
    return "".join(parts)
