"""The caption-conditioned ceiling for gen_psnr: parsing, closed form vs sampling, and that it
is a ceiling (the expected image beats any single image the caption allows)."""

import numpy as np
import pytest

from setok.data.scenes import EVAL_SEED_BASE, make_scene
from setok.errors import InputError
from setok.eval.ceiling import (
    expected_image,
    gen_ceiling_psnr,
    parse_caption,
    sample_image,
)
from setok.eval.metrics import flat_baseline_psnr, psnr

SCENES = [make_scene(EVAL_SEED_BASE + i) for i in range(24)]


def test_parse_caption_recovers_every_object_and_the_background():
    for scene in SCENES:
        objects, bg_name, kind = parse_caption(scene.caption)
        assert [(o.size, o.color, o.shape, o.position) for o in objects] == [
            (o.size, o.color, o.shape, o.position) for o in scene.objects
        ]
        assert f"{bg_name} {kind}" == scene.background


def test_parse_caption_rejects_other_text():
    with pytest.raises(InputError, match="expected the scene generator's form"):
        parse_caption("a photo of a dog")


def test_expected_image_is_the_mean_of_sampled_images():
    caption = SCENES[0].caption
    rng = np.random.default_rng(7)
    sampled = np.mean([sample_image(rng, caption) for _ in range(600)], axis=0) / 255.0
    exact = expected_image(caption)
    assert exact.shape == (64, 64, 3)
    assert np.abs(sampled - exact).mean() < 0.01  # Monte Carlo noise only


def test_expected_image_beats_single_draws_and_the_flat_baseline():
    truth = [s.image.astype(np.float64) / 255.0 for s in SCENES]
    rng = np.random.default_rng(3)
    draws = [psnr(np.clip(sample_image(rng, s.caption) / 255.0, 0, 1), t) for s, t in zip(SCENES, truth)]
    ceiling = gen_ceiling_psnr([s.caption for s in SCENES], [s.image for s in SCENES])
    assert ceiling > np.mean(draws) + 1.0
    assert ceiling > np.mean([flat_baseline_psnr(t) for t in truth])
