"""User folders and image loading, with real files written by PIL."""

import json

import numpy as np
import pytest
from PIL import Image

from setok.data.folder import Sample, load_folder
from setok.errors import InputError
from setok.runtime.preprocess import load_image


def write_folder(root, lines, images=("a.png", "b.png")):
    root.mkdir(exist_ok=True)
    for name in images:
        Image.new("RGB", (20, 10), (200, 10, 10)).save(root / name)
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def line(image, text="a red thing"):
    return json.dumps({"image": image, "text": text})


def test_valid_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "c.png")
    write_folder(tmp_path, [line("a.png"), "", line("sub/c.png", "black")])
    samples = load_folder(tmp_path)
    assert samples == [Sample(tmp_path / "a.png", "a red thing"), Sample(tmp_path / "sub" / "c.png", "black")]


def test_custom_captions_name(tmp_path):
    write_folder(tmp_path, [])
    (tmp_path / "other.jsonl").write_text(line("b.png") + "\n")
    assert load_folder(str(tmp_path), captions="other.jsonl")[0].image_path == tmp_path / "b.png"


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="nope"):
        load_folder(tmp_path / "nope")


def test_missing_captions(tmp_path):
    with pytest.raises(InputError, match="captions.jsonl") as e:
        load_folder(tmp_path)
    assert '{"image": ..., "text": ...}' in str(e.value)


@pytest.mark.parametrize(
    "bad",
    ["{not json", json.dumps({"image": "a.png"}), json.dumps(["a.png", "x"]), json.dumps({"image": 3, "text": "x"})],
)
def test_bad_line_names_line_number(tmp_path, bad):
    write_folder(tmp_path, [line("a.png"), bad])
    with pytest.raises(InputError, match=r"captions\.jsonl:2") as e:
        load_folder(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_image(tmp_path):
    write_folder(tmp_path, [line("a.png"), line("gone.png")])
    with pytest.raises(InputError, match=r"captions\.jsonl:2.*gone\.png"):
        load_folder(tmp_path)


def test_empty_folder(tmp_path):
    write_folder(tmp_path, ["", "  "])
    with pytest.raises(InputError, match=r"captions\.jsonl has no samples"):
        load_folder(tmp_path)


@pytest.mark.parametrize("rel", ["../a.png", "sub/../../a.png", "/etc/passwd", "C:\\x.png", "..\\a.png"])
def test_escaping_path_refused(tmp_path, rel):
    root = tmp_path / "data"
    write_folder(root, [line(rel)])
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match=r"captions\.jsonl:1.*leaves the folder"):
        load_folder(root)


def check(arr, size):
    assert isinstance(arr, np.ndarray) and arr.shape == (size, size, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1", "CMYK", "RGB"])
def test_modes(tmp_path, mode):
    im = Image.new("RGB", (30, 20), (10, 120, 240)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    if mode == "CMYK":
        im.save(path, quality=95)
    else:
        im.save(path)
    check(load_image(path, 16), 16)


def test_rgba_transparent_is_white(tmp_path):
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert (load_image(tmp_path / "t.png", 8) == 255).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png", 10)
    check(out, 10)
    assert tuple(out[5, 5]) == (255, 255, 255)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    arr = np.full((12, 12), 32768, np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png", 12)
    check(out, 12)
    assert 120 <= int(out[6, 6, 0]) <= 135


def test_sixteen_bit_in_memory_mode(tmp_path):
    im = Image.fromarray(np.full((12, 12), 65535, np.uint16))
    assert im.mode.startswith("I;16")
    im.save(tmp_path / "g16.tiff")
    assert (load_image(tmp_path / "g16.tiff", 6) == 255).all()


def test_resize_and_center_crop(tmp_path):
    # 40x20: left quarter red, middle half green, right quarter blue -> crop keeps only green.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:30] = (0, 255, 0)
    arr[:, 30:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 10)
    check(out, 10)
    assert (out[:, 2:8, 1] > 200).all() and (out[:, 2:8, 0] < 60).all()


def test_exif_rotation(tmp_path):
    # Stored 40x20 with red on the left; orientation 6 means "rotate 90 degrees clockwise to view",
    # so the viewed image is 20x40 with red on top.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg", 20)
    check(out, 20)
    out = out.astype(int)
    top, bottom = out[2, 10], out[-3, 10]
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_missing_image_file(tmp_path):
    with pytest.raises(InputError, match="nothere.png"):
        load_image(tmp_path / "nothere.png", 8)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.jpg.*0 bytes"):
        load_image(tmp_path / "empty.jpg", 8)


def test_not_an_image(tmp_path):
    (tmp_path / "text.png").write_text("hello, not a png")
    with pytest.raises(InputError, match=r"text\.png"):
        load_image(tmp_path / "text.png", 8)


def test_truncated_image(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "full.png"
    )
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.png"):
        load_image(tmp_path / "cut.png", 8)


def test_too_many_pixels_refused_before_decoding(tmp_path):
    # A 1-bit 8000x6000 PNG of zeros is tiny on disk but 48 megapixels.
    Image.new("1", (8000, 6000)).save(tmp_path / "huge.png")
    with pytest.raises(InputError, match=r"huge\.png.*8000x6000"):
        load_image(tmp_path / "huge.png", 8)


def test_bad_size(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(InputError):
        load_image(tmp_path / "a.png", 0)
