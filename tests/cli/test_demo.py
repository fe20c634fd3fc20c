"""`setok demo`'s picture: under each generated image, what the object judge reads in it."""

import numpy as np
from PIL import Image

from setok.cli.demo import _label_band, show_scenes


def test_label_band_draws_text_in_its_column():
    band = _label_band(1280, 768, ["judge read:", "small red circle at top left"])
    assert band.shape == (28, 1280, 3) and band.dtype == np.uint8
    assert band[:, :768].max() == 16 and band[:, 768:].max() > 200  # text only from column 768 on


def test_demo_picture_labels_generated_images(tiny_ckpt, tmp_path):
    lines: list[str] = []
    show_scenes(tiny_ckpt, tmp_path / "scenes.png", lines.append, count=2)
    picture = np.asarray(Image.open(tmp_path / "scenes.png"))
    assert picture.shape[0] > 2 * 4 * 64  # two rows of tiles plus a label band under each
    assert sum("as the judge reads it" in line for line in lines) == 2
