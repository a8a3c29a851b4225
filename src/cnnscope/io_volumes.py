"""Reading volumes for 3-D models: NIfTI (nibabel), a DICOM series folder (pydicom), a multi-page TIFF and ``.npy``;
writing a map back as NIfTI with the scan's affine, so 3D Slicer or ITK-SNAP show it over the scan.

A volume is a channels-last (D, H, W, C) array: D the slices (z), H the rows (y), W the columns (x; the last axis
of an ``.npy``), in its stored values (scaled to [0, 1] by the model's preprocessing). NIfTI stores (x, y, z):
it is read as (z, y, x) and written back in its own order, so the affine stays the file's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".tif", ".tiff")
CLIP_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


@dataclass(frozen=True, eq=False)
class Volume:
    """A scan: ``values`` (D, H, W, C) as stored, the voxel-to-world ``affine`` (4 x 4, of the file's own axis
    order when ``nifti_order``), and the display ``window`` the file suggests (DICOM), if any."""

    values: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    window: tuple[float, float] | None = None
    nifti_order: bool = False


@dataclass(frozen=True, eq=False)
class Clip(Volume):
    """A video clip for a (N, C, T, H, W) model: ``values`` (T, H, W, C) are the ``frames`` (indices into the
    input's frames, sampled uniformly to the model's T) of an input of ``total`` frames at ``fps``."""

    frames: tuple[int, ...] = ()
    total: int = 0
    fps: float = 0.0


def sample_frames(total: int, count: int) -> list[int]:
    """``count`` frame indices spread uniformly over ``total`` frames (first and last included; repeats when
    the clip is shorter than the model's T)."""
    if total < 1:
        raise InputError("the clip has no frames")
    return np.linspace(0, total - 1, count).round().astype(int).tolist()


def read_clip(source: str | os.PathLike, frames: int) -> Clip:
    """A clip from a video file (MP4, AVI, MOV, MKV, WebM: imageio with ffmpeg, the ``video`` extra), an animated
    GIF or a folder of frame images (sorted by name), sampled uniformly to ``frames`` frames."""
    from .io import IMAGE_SUFFIXES, read_image

    path = Path(source)
    name = f"'{path}'"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{name} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
        chosen = sample_frames(len(files), frames)
        pictures = [read_image(files[index]) for index in chosen]
        return Clip(_same_size(pictures, name), frames=tuple(chosen), total=len(files))
    if _suffix(path) == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as image:
            everything = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
            duration = float(image.info.get("duration", 0) or 0)
        chosen = sample_frames(len(everything), frames)
        fps = 1000.0 / duration if duration > 0 else 0.0
        return Clip(np.stack([everything[i] for i in chosen]), frames=tuple(chosen), total=len(everything), fps=fps)
    if _suffix(path) not in CLIP_SUFFIXES:
        raise InputError(f"{name} is not a clip this reads ({', '.join(CLIP_SUFFIXES)}, or a folder of frames)")
    from .render.animate import require_video

    imageio = require_video()
    try:
        reader = imageio.get_reader(str(path), format="FFMPEG")
        try:
            fps = float(reader.get_meta_data().get("fps", 0) or 0)
            everything = [np.asarray(frame) for frame in reader]
        finally:
            reader.close()
    except Exception as exc:  # ffmpeg's errors come in several kinds
        raise InputError(f"{name} is not a readable video ({type(exc).__name__}: {exc})") from None
    chosen = sample_frames(len(everything), frames)
    return Clip(np.stack([everything[i] for i in chosen]), frames=tuple(chosen), total=len(everything), fps=fps)


def _same_size(pictures: list[np.ndarray], name: str) -> np.ndarray:
    if len({picture.shape for picture in pictures}) != 1:
        raise InputError(f"{name}: the frames must all have the same size and channels")
    return np.stack(pictures)


def is_clip_source(source: object) -> bool:
    """Whether ``source`` names a clip: a video file, an animated GIF, or a folder of frame images."""
    from .io import IMAGE_SUFFIXES

    if isinstance(source, Clip):
        return True
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file())
    return _suffix(path) in CLIP_SUFFIXES


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"reading this volume needs {module}: install cnnscope[medical]") from None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_volume(source: str | os.PathLike | np.ndarray | Volume, frames: int | None = None) -> Volume:
    """A :class:`Volume` from a NIfTI file, a DICOM series folder, a multi-page TIFF, an ``.npy`` file or an array
    (D, H, W) or (D, H, W, C); with ``frames`` (the model's T), a video, GIF or folder of frames is read as a
    :class:`Clip` of that many frames."""
    if isinstance(source, Volume):
        return source
    if frames is not None and is_clip_source(source):
        return read_clip(source, frames)
    if isinstance(source, np.ndarray):
        return Volume(_checked(source, "the array"))
    path = Path(source)
    name = f"'{path}'"
    if not path.exists():
        raise InputError(f"{name}: no such file or folder")
    if path.is_dir():
        return read_dicom_series(path)
    suffix = _suffix(path)
    if suffix == ".npy":
        from .io import read_npy

        return Volume(_checked(read_npy(path), name))
    if suffix in (".nii", ".nii.gz"):
        nibabel = _need("nibabel")
        try:
            image = nibabel.load(str(path))
            values = np.asanyarray(image.dataobj)
        except Exception as exc:  # nibabel raises many kinds for a broken file
            raise InputError(f"{name} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
        if values.ndim not in (3, 4):
            raise InputError(f"{name} holds a {values.ndim}-D array; a volume is 3-D (or 4-D with channels last)")
        values = np.swapaxes(values, 0, 2)  # (x, y, z[, c]) -> (z, y, x[, c])
        return Volume(_checked(np.ascontiguousarray(values), name), np.asarray(image.affine), nifti_order=True)
    if suffix in (".tif", ".tiff"):
        from PIL import Image, ImageSequence

        from .io import _pil_native

        with Image.open(path) as image:
            pages = [_pil_native(page.copy(), name) for page in ImageSequence.Iterator(image)]
        if len({page.shape for page in pages}) != 1:
            raise InputError(f"{name}: the pages of a TIFF stack must all have the same size")
        return Volume(_checked(np.stack(pages), name))
    raise InputError(f"{name} is not a volume this reads ({', '.join(VOLUME_SUFFIXES)}, or a DICOM series folder)")


def _checked(values: np.ndarray, name: str) -> np.ndarray:
    if values.ndim == 3:
        values = values[..., None]
    if values.ndim != 4 or min(values.shape) < 1:
        raise InputError(f"{name} has shape {tuple(values.shape)}; a volume is (D, H, W) or (D, H, W, C)")
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        raise InputError(f"{name} has dtype {values.dtype}; use integers, floats or bools")
    return values


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """The slices of a DICOM series folder, sorted by their position along the slice normal (ImagePositionPatient
    projected on the ImageOrientationPatient normal; InstanceNumber when there is none), each rescaled by its
    RescaleSlope and RescaleIntercept (CT in Hounsfield units). ``window`` is the first slice's WindowCenter /
    WindowWidth, when it has them."""
    pydicom = _need("pydicom")
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    slices = []
    for path in files:
        try:
            dataset = pydicom.dcmread(str(path))
        except Exception:  # not a DICOM file (a README, a DICOMDIR without pixels): skipped
            continue
        if "PixelData" in dataset:
            slices.append(dataset)
    if not slices:
        raise InputError(f"'{folder}' holds no DICOM slices with pixel data")

    def position(dataset) -> float:
        origin = getattr(dataset, "ImagePositionPatient", None)
        orientation = getattr(dataset, "ImageOrientationPatient", None)
        if origin is None or orientation is None:
            return float(getattr(dataset, "InstanceNumber", 0) or 0)
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return float(np.dot(normal, np.asarray(origin, float)))

    slices.sort(key=position)
    planes = []
    for dataset in slices:
        slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
        intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
        planes.append(dataset.pixel_array.astype(np.float32) * slope + intercept)
    if len({plane.shape for plane in planes}) != 1:
        raise InputError(f"'{folder}': the slices of the series have different sizes")
    window = None
    first = slices[0]
    if "WindowCenter" in first and "WindowWidth" in first:
        center = first.WindowCenter
        width = first.WindowWidth
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if width > 0:
            window = (center - width / 2, center + width / 2)
    affine = np.eye(4)
    spacing = getattr(first, "PixelSpacing", None)
    if spacing is not None:
        affine[0, 0], affine[1, 1] = float(spacing[1]), float(spacing[0])
    if len(slices) > 1:
        affine[2, 2] = abs(position(slices[1]) - position(slices[0])) or 1.0
    return Volume(np.stack(planes)[..., None], affine, window)


def write_nifti(path: str | os.PathLike, heat: np.ndarray, volume: Volume | None = None) -> Path:
    """A (D, H, W) map as NIfTI: in the scan's own axis order and with its affine when ``volume`` came from a NIfTI
    file (the map lies on the scan in any viewer), else with ``volume``'s affine (identity without one)."""
    nibabel = _need("nibabel")
    values = np.asarray(heat, dtype=np.float32)
    affine = np.eye(4) if volume is None else np.asarray(volume.affine, dtype=np.float64)
    values = np.swapaxes(values, 0, 2)  # (z, y, x) -> NIfTI's (x, y, z), the order the affines here are written in
    target = Path(path)
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(values), affine), str(target))
    return target
