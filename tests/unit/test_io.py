import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cnnscope import InputError, load_image, load_images
from cnnscope.io import find_images


@pytest.fixture
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:20, :30] = (255, 0, 0)  # red top-left marks the orientation
    image[20:, 30:] = rng.integers(0, 255, (20, 30, 3))
    return image


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif", ".bmp", ".gif"])
def test_formats_read_as_rgb_uint8(tmp_path, photo, suffix):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(photo).save(path)
    image = load_image(path)
    assert image.shape == (40, 60, 3) and image.dtype == np.uint8
    red = image[:20, :30].astype(int).mean(axis=(0, 1))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60  # lossy formats stay close


def test_gif_takes_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(path)[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(photo).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.shape == (60, 40, 3)
    assert image[:30, 20:].astype(int)[..., 0].mean() > 200  # the red corner moved to the top-right


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA"])
def test_modes_convert_to_rgb(tmp_path, photo, mode):
    path = tmp_path / "m.png" if mode != "CMYK" else tmp_path / "m.jpg"
    Image.fromarray(photo).convert(mode).save(path)
    assert load_image(path).shape == (40, 60, 3)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert (load_image(path) == 255).all()


def test_sixteen_bit_scales_to_eight(tmp_path):
    values = np.full((4, 4), 65535, dtype=np.uint16)
    values[0, 0] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    assert image[1, 1].tolist() == [255, 255, 255] and image[0, 0].tolist() == [0, 0, 0]


def test_arrays_and_pil(photo):
    assert load_image(Image.fromarray(photo)).tolist() == photo.tolist()
    assert load_image(photo.astype(np.float32) / 255.0).tolist() == photo.tolist()
    assert load_image(photo[..., 0]).shape == (40, 60, 3)
    copy = photo.copy()
    load_image(photo)[0, 0] = 7
    assert np.array_equal(photo, copy), "the caller's array must not be modified"


def _png_claiming(width: int, height: int) -> bytes:
    buffer = __import__("io").BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # b'IHDR' + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "missing.jpg", "no such file"),
        (lambda d: d, "is a directory"),
        (
            lambda d: ((d / "empty.png").write_bytes(b"") and d / "empty.png") or d / "empty.png",
            "empty (0 bytes)",
        ),
        (lambda d: (d / "notes.jpg").write_text("hello") and d / "notes.jpg", "is not an image"),
        (
            lambda d: (d / "bomb.png").write_bytes(_png_claiming(60000, 60000)) and d / "bomb.png",
            "over the limit",
        ),
    ],
)
def test_bad_files_raise_one_input_error_naming_the_file(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_image(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_truncated_file(tmp_path, photo):
    path = tmp_path / "cut.png"
    Image.fromarray(photo).save(path)
    path.write_bytes(path.read_bytes()[:120])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(path)


def test_pixel_limit_is_an_option(tmp_path, photo):
    path = tmp_path / "x.png"
    Image.fromarray(photo).save(path)
    with pytest.raises(InputError, match="over the limit"):
        load_image(path, max_pixels=100)


def test_bad_arrays():
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((3, 8, 8)))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 2.0))
    with pytest.raises(InputError, match="cannot read an image from a int"):
        load_image(3)


def test_find_images_expands_folders(tmp_path, photo):
    for name in ["b.png", "a.jpg"]:
        Image.fromarray(photo).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in find_images([tmp_path])] == ["a.jpg", "b.png"]
    assert len(load_images(find_images([tmp_path]))) == 2
    with pytest.raises(InputError, match="holds no image files"):
        find_images([tmp_path / "sub"] if (tmp_path / "sub").mkdir() is None else [])


def test_overlay_blends_on_the_original_and_keeps_zero_evidence_clear():
    from cnnscope.render import overlay

    image = np.full((30, 40, 3), 100, dtype=np.uint8)
    heat = np.zeros((7, 7), dtype=np.float32)
    heat[3, 3] = 1.0
    plain = overlay(image, heat, alpha=0.5)
    assert plain.shape == (30, 40, 3)
    signed = overlay(image, -heat, alpha=0.5, signed=True)
    assert (signed[0, 0] == 100).all()  # zero evidence: the photo unchanged
    centre = signed[15, 20].astype(int)
    assert centre[2] > centre[0]  # negative evidence drawn blue


def test_label_images_become_region_labels(tmp_path):
    from cnnscope.io import load_labels

    colours = np.zeros((4, 6, 3), dtype=np.uint8)
    colours[:, 2:4] = (255, 0, 0)
    colours[:, 4:] = (0, 128, 7)
    Image.fromarray(colours).save(tmp_path / "labels.png")
    labels = load_labels(tmp_path / "labels.png")
    assert labels.shape == (4, 6) and sorted(np.unique(labels)) == [0, 0x008007, 0xFF0000]
    grey = np.array([[3, 3, 9], [9, 200, 3]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert np.array_equal(load_labels(tmp_path / "grey.png"), grey)  # a grey level is its own label
    assert np.array_equal(load_labels(grey.astype(np.int32)), grey)


@pytest.mark.parametrize("chunk", ["ztxt", "iccp"])
def test_oversized_png_metadata_is_one_input_error(chunk):
    import io

    from PIL import PngImagePlugin

    from cnnscope.errors import InputError
    from cnnscope.io import load_image

    buffer = io.BytesIO()
    picture = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    if chunk == "ztxt":
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", "x" * 20_000_000, zip=True)  # 20 KB on disk, 20 MB inflated
        picture.save(buffer, "PNG", pnginfo=info)
    else:
        picture.save(buffer, "PNG", icc_profile=b"y" * 30_000_000)
    with pytest.raises(InputError, match="cannot be read: Decompressed data too large"):
        load_image(buffer.getvalue())
