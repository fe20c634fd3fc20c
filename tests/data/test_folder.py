"""The user-data loader: a folder of real image files plus captions.jsonl."""

import json

import numpy as np
import pytest
from PIL import Image

from setok.data.folder import load_folder, load_image
from setok.errors import InputError


def make_folder(tmp_path, lines):
    Image.fromarray(np.full((30, 40, 3), 120, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_valid_folder(tmp_path):
    samples = load_folder(make_folder(tmp_path, [json.dumps({"image": "a.png", "text": "a grey picture"})]))
    assert len(samples) == 1 and samples[0].text == "a grey picture"
    assert load_image(samples[0].image_path, 64).shape == (64, 64, 3)


@pytest.mark.parametrize("lines, needle", [
    (["not json"], "captions.jsonl:1"),
    ([json.dumps({"image": "a.png"})], "captions.jsonl:1"),
    ([json.dumps({"image": "missing.png", "text": "x"})], "missing.png"),
    ([json.dumps({"image": "../a.png", "text": "x"})], "leaves the folder"),
    ([""], "no samples"),
])
def test_folder_errors_name_the_file(tmp_path, lines, needle):
    with pytest.raises(InputError, match=needle):
        load_folder(make_folder(tmp_path, lines))


def test_missing_folder_and_captions(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_folder(tmp_path / "nope")
    with pytest.raises(InputError, match="captions.jsonl"):
        load_folder(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_modes_become_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 33, 3), dtype=np.uint8)
    if mode == "I;16":
        im = Image.new("I;16", (33, 20))
        im.frombytes((rgb[..., 0].astype("<u2") * 257).tobytes())
    else:
        im = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    out = load_image(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_exif_rotation_is_applied(tmp_path):
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, :5] = 255  # white band on the left of a wide image
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "r.jpg", 10)  # displayed tall: 10 wide, 30 high -> top crop band
    assert out.shape == (10, 10, 3)
    with Image.open(tmp_path / "r.jpg") as im:
        assert im.size == (30, 10)


@pytest.mark.parametrize("content, needle", [(b"", "empty"), (b"not an image at all", "not a readable image")])
def test_bad_files(tmp_path, content, needle):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(InputError, match=needle):
        load_image(tmp_path / "bad.png", 16)


def test_truncated_file(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="t.png"):
        load_image(tmp_path / "t.png", 16)
