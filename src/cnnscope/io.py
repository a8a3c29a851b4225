"""Reading images: every format Pillow reads, as an RGB uint8 array for display (``load_image``) or as the
stored values and channels for a model (``read_image``).

``load_image`` applies the EXIF orientation, converts grayscale, RGBA (composited on white),
palette, CMYK and 16-bit images to 8-bit RGB, takes the first frame of animations, and refuses
images above a pixel limit before decoding them (decompression bombs). Every problem raises one
:class:`~cnnscope.errors.InputError` naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import io as _io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

#: Default limit on width x height, checked from the header before any pixel is decoded.
MAX_PIXELS = 100_000_000

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, bytes):
        return "the uploaded image"
    return f"the {type(source).__name__} image"


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read one image into an (H, W, 3) uint8 RGB array.

    ``source`` is a path, the file's bytes, a PIL image or an array: (H, W), (H, W, 1), (H, W, 3)
    or (H, W, 4), uint8 or float in [0, 1]. The caller's array is never modified.
    """
    name = _describe(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name)
    if isinstance(source, Image.Image):
        _check_size(source.size, name, max_pixels)
        return _pil_to_rgb(source, name)
    if isinstance(source, bytes):
        if not source:
            raise InputError(f"{name} is empty (0 bytes)")
        return _open_and_convert(_io.BytesIO(source), name, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(
            f"cannot read an image from a {type(source).__name__}; give a file path, bytes, "
            "a PIL image or a numpy array"
        )
    path = Path(source)
    if not path.exists():
        raise InputError(f"{name}: no such file")
    if path.is_dir():
        raise InputError(f"{name} is a directory, not an image; pass the image files inside it")
    if path.stat().st_size == 0:
        raise InputError(f"{name} is empty (0 bytes)")
    try:
        with path.open("rb") as handle:
            return _open_and_convert(handle, name, max_pixels)
    except PermissionError:
        raise InputError(f"{name}: permission denied") from None


def read_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read one image as it is stored, for a model: a channels-last (H, W, C) array in its own dtype (uint8,
    uint16, int32, float32), C being 1 for grey, 3 for RGB, 4 for RGBA, or N for a multi-page TIFF (one page
    per channel) or an ``.npy`` array (H, W) or (H, W, C). Scaling to [0, 1] is the model's preprocessing
    (:func:`~cnnscope.models.preprocess.unit_range`): 16-bit and float values are never wrapped into 8 bits.
    Arrays are returned as they are (a view, never modified)."""
    name = _describe(source)
    if isinstance(source, np.ndarray):
        return _native_array(source, name)
    if isinstance(source, Image.Image):
        _check_size(source.size, name, max_pixels)
        return _pil_native(source, name)
    if isinstance(source, bytes):
        if not source:
            raise InputError(f"{name} is empty (0 bytes)")
        return _open_native(_io.BytesIO(source), name, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        return load_image(source)  # the same one-line error for anything else
    path = Path(source)
    if path.suffix.lower() == ".npy" and path.is_file():
        return _native_array(read_npy(path), name)
    if not path.exists() or path.is_dir() or path.stat().st_size == 0:
        return load_image(source)  # its one-line errors
    try:
        with path.open("rb") as handle:
            return _open_native(handle, name, max_pixels)
    except PermissionError:
        raise InputError(f"{name}: permission denied") from None


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """A ``.npy`` file's array (no pickles: a file cannot run code)."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"'{os.fspath(path)}' is not a readable .npy array ({exc})") from None


def display_rgb(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """A channels-last image of any dtype and channel count (as :func:`read_image` gives) as the (H, W, 3)
    uint8 picture under an overlay: grey as grey, RGB as it is, RGBA composited on white, other channel counts
    as the grey mean of their channels. Values are scaled as the model's preprocessing scales them."""
    from .models.preprocess import unit_range

    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype == np.uint8 and image.shape[-1] == 3 and window is None:
        return image
    pixels = unit_range(image, window)
    channels = pixels.shape[-1]
    if channels == 4:
        pixels = pixels[..., :3] * pixels[..., 3:4] + (1.0 - pixels[..., 3:4])
    elif channels != 3:
        pixels = pixels.mean(axis=-1, keepdims=True) if channels > 1 else pixels
    rgb = np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb


def load_images(sources: Iterable[ImageSource], *, max_pixels: int = MAX_PIXELS) -> list[np.ndarray]:
    """``load_image`` for each source, in order."""
    return [load_image(source, max_pixels=max_pixels) for source in sources]


def load_labels(source: ImageSource) -> np.ndarray:
    """(H, W) int64 region labels, for a user's own regions (LIME's ``feature_mask``): a 2-D integer
    array (numpy or torch) as it is, or an image (path, bytes, PIL image, (H, W, 3) array) in which each
    distinct colour is one region, as annotation tools save label PNGs (the grey level of a greyscale
    image is its label; a colour's label is 0xRRGGBB)."""
    if hasattr(source, "detach") and hasattr(source, "cpu"):  # a torch tensor, without importing torch here
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray) and source.ndim == 2:
        if not np.issubdtype(source.dtype, np.integer) and not np.issubdtype(source.dtype, np.bool_):
            raise InputError(f"a region mask must hold integer labels, not {source.dtype} values")
        return source.astype(np.int64)
    pixels = load_image(source).astype(np.int64)
    if (pixels[..., :1] == pixels).all():  # a greyscale label image: its values are the labels
        return pixels[..., 0]
    return pixels @ np.array([1 << 16, 1 << 8, 1])  # each colour as 0xRRGGBB


def safe_filename(text: str, keep: str = "-_.") -> str:
    """``text`` as part of a file name: letters and digits kept, as are the characters in ``keep``;
    everything else becomes ``_``."""
    return "".join(ch if ch.isalnum() or ch in keep else "_" for ch in text)


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories into the image files directly inside them (sorted); keep files as given."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise InputError(f"'{path}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            found.extend(inside)
        else:
            found.append(path)
    return found


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a decompression bomb?); raise max_pixels if you trust it"
        )


def _open_checked(handle: _io.IOBase, name: str, max_pixels: int) -> Image.Image:
    """``Image.open`` with every failure as one InputError and the pixel limit checked from the header (call it
    with Pillow's DecompressionBombWarning silenced: our own limit says the same)."""
    try:
        image = Image.open(handle)
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image (no format Pillow reads recognises it)") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{name} is over the limit of pixels that decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow raises ValueError for oversized metadata (a zTXt/iCCP chunk that inflates past its limit)
        raise InputError(f"{name} cannot be read: {exc}") from None
    _check_size(image.size, name, max_pixels)
    return image


def _open_and_convert(handle: _io.IOBase, name: str, max_pixels: int) -> np.ndarray:
    with warnings.catch_warnings():
        # Our own limit is checked from the header below; Pillow's warning would repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open_checked(handle, name, max_pixels)
        try:
            image.seek(0)  # first frame of an animation
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(f"{name} is truncated or corrupt ({exc})") from None
        return _pil_to_rgb(image, name)


def _open_native(handle: _io.IOBase, name: str, max_pixels: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open_checked(handle, name, max_pixels)
        try:
            frames = int(getattr(image, "n_frames", 1) or 1)
            if image.format == "TIFF" and frames > 1:  # a multi-page TIFF: one page per channel
                pages = []
                for index in range(frames):
                    image.seek(index)
                    image.load()
                    page = _pil_native(image, name)
                    if pages and page.shape[:2] != pages[0].shape[:2]:
                        raise InputError(
                            f"{name}: page {index} is {page.shape[1]}x{page.shape[0]} but page 0 is "
                            f"{pages[0].shape[1]}x{pages[0].shape[0]}; the pages of a multi-channel TIFF must match"
                        )
                    pages.append(page)
                dtype = np.result_type(*[page.dtype for page in pages])
                return np.concatenate([page.astype(dtype) for page in pages], axis=-1)
            image.seek(0)  # first frame of an animation
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(f"{name} is truncated or corrupt ({exc})") from None
        return _pil_native(image, name)


def _pil_native(image: Image.Image, name: str) -> np.ndarray:
    """A decoded PIL image as channels-last values in their own dtype (see :func:`read_image`)."""
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)[:, :, None]
    if mode in ("I", "F"):
        return np.asarray(image)[:, :, None]
    if mode in ("L", "RGB"):
        values = np.asarray(image, dtype=np.uint8)
        return values[:, :, None] if mode == "L" else values
    if mode in ("1",):
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]
    if mode in ("LA", "La"):
        values = np.asarray(image.convert("LA"), dtype=np.float32)
        alpha = values[:, :, 1:2] / 255.0
        return np.round(values[:, :, :1] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"), dtype=np.uint8)
    return _pil_to_rgb(image, name)


def _native_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise InputError(
            f"{name} has shape {tuple(array.shape)}; expected (H, W) or (H, W, C) (channels last; for a (C, H, W) "
            "tensor, pass it to the model as a preprocessed batch instead)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise InputError(f"{name} has no pixels (shape {tuple(array.shape)})")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise InputError(f"{name} has dtype {array.dtype}; use integers, floats or bools")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return array


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose the picture
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            high = 1.0 if values.size and values.max() <= 1.0 else float(values.max() or 1.0)
        else:
            high = 65535.0 if values.size and values.max() > 255 else 255.0
        gray = np.clip(np.round(values / high * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"{name} has an image mode ({mode}) that cannot be converted to RGB: {exc}") from None
    return np.array(rgb, dtype=np.uint8)


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(
            f"{name} has shape {tuple(array.shape)}; expected (H, W), (H, W, 3) or (H, W, 4) "
            "(for a (3, H, W) tensor, pass it to the model as a preprocessed batch instead)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} has no pixels (shape {tuple(array.shape)})")
    if array.dtype == np.uint8:
        values = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{name} contains NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise InputError(
                f"{name} is a float array with values in [{array.min():.3g}, {array.max():.3g}]; "
                "float images must be in [0, 1] (or pass uint8)"
            )
        values = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype == np.uint16:
        values = np.round(array / 257.0).astype(np.uint8)
    elif array.dtype == np.bool_:
        values = array.astype(np.uint8) * 255
    else:
        raise InputError(f"{name} has dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1]")
    if values.ndim == 2:
        return np.repeat(values[:, :, None], 3, axis=2)
    if values.shape[2] == 4:
        alpha = values[:, :, 3:4].astype(np.float32) / 255.0
        blended = values[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.round(blended).astype(np.uint8)
    return np.array(values, dtype=np.uint8, copy=True)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file in the same folder, synced, then renamed: a reader (or a
    run resumed after a crash) sees the old file or the new one, never half of one."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
