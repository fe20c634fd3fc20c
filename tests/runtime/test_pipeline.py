"""The torch-free runtime on a real exported bundle, against the PyTorch reference."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from setok import manifest as M
from setok.data.items import eval_items
from setok.errors import InputError
from setok.manifest import BundleError
from setok.model.encoder import preprocess
from setok.model.setokim import Setokim
from setok.runtime import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.open(tiny_bundle)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return Setokim.from_pretrained(tiny_ckpt).requires_grad_(False)


@pytest.fixture(scope="module")
def scenes():
    return eval_items(3, seed=21)


def test_importing_the_runtime_pulls_in_no_torch(tiny_bundle, scenes):
    code = ("import sys, numpy as np; from setok.runtime import Pipeline; "
            f"p = Pipeline.open({str(tiny_bundle)!r}); p.caption(np.zeros((64, 64, 3), np.uint8), max_new_tokens=2); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_tokenize_matches_torch_and_masks_partition_the_image(pipe, model, scenes):
    for it in scenes:
        vt = pipe.tokenize(it.image)
        ref = model.vision(preprocess(torch.from_numpy(it.image[None])))
        k = int(ref.clusters.num_tokens[0])
        assert vt.num_tokens == k and vt.tokens.shape == (k, model.cfg.merger.token_dim)
        np.testing.assert_array_equal(vt.assignment, ref.clusters.assignment[0].numpy())
        np.testing.assert_allclose(vt.tokens, ref.tokens[0, :k].numpy(), atol=1e-4)
        assert vt.masks.shape == (k, 64, 64) and np.all(vt.masks.sum(0) == 1), "each pixel owned by one token"
        assert {"preprocess", "encoder", "cluster", "merger"} <= set(vt.timings)


def test_llm_sees_exactly_num_tokens(pipe, scenes):
    vt = pipe.tokenize(scenes[0].image)
    q = "how many objects are there"
    embeds, first = pipe.prompt(vt, pipe.prompts["question"], q=q)
    before, after = (len(pipe.encode(t)) for t in M.split_prompt(pipe.prompts["question"], q=q))
    assert before > 0 and after > 0  # the question is read before the image, the answer cue after
    assert first == 2 + before  # <bos> question.. <im_start>
    assert embeds.shape[1] == first + vt.num_tokens + 1 + after


def test_greedy_text_matches_torch(pipe, model, scenes):
    for it in scenes:
        ref = model.vision(preprocess(torch.from_numpy(it.image[None])))
        t, c = ref.tokens, ref.clusters.num_tokens
        vt = pipe.tokenize(it.image)
        assert pipe.caption(vt).text == model.caption(t, c)[0]
        q = it.qa[0][0]
        assert pipe.answer(vt, q).text == model.answer(t, c, [q])[0]


def test_stream_yields_the_caption(pipe, scenes):
    vt = pipe.tokenize(scenes[1].image)
    pieces = list(pipe.stream(vt, max_new_tokens=12))
    assert "".join(pieces).strip() == pipe.caption(vt, max_new_tokens=12).text


# Sampling (changes the output, a seed fixes it): tests/runtime/test_api.py on the shipped checkpoint.


def test_segment_and_generate_shapes(pipe, scenes):
    """Shapes and types on the tiny model; content (mask IoU, generated colour) is checked on the
    shipped checkpoint in tests/runtime/test_content.py."""
    it = scenes[0]
    m = pipe.segment(it.image, it.referring[0][0])
    assert m.mask.shape == (64, 64) and m.mask.dtype == bool
    assert m.selected.shape == (pipe.tokenize(it.image).num_tokens,)
    g = pipe.generate_image(it.caption)
    assert g.image.shape == (64, 64, 3) and g.image.dtype == np.uint8
    assert 1 <= g.num_tokens <= pipe.max_tokens and "detokenizer" in g.timings


def test_plugin_form_agrees_with_standard_ops(pipe, scenes):
    for it in scenes:
        a, b = pipe.tokenize(it.image), pipe.tokenize(it.image, cluster_stage="cluster_plugin")
        np.testing.assert_array_equal(a.assignment, b.assignment)
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_image_inputs_are_equivalent(pipe, scenes, tmp_path):
    rgb = scenes[2].image
    Image.fromarray(rgb).save(tmp_path / "x.png")
    ref = pipe.tokenize(rgb).assignment
    for image in (tmp_path / "x.png", str(tmp_path / "x.png"), Image.fromarray(rgb), rgb.astype(np.float32) / 255):
        np.testing.assert_array_equal(pipe.tokenize(image).assignment, ref)


def test_right_sized_arrays_skip_pil_and_match_it():
    from setok.runtime.preprocess import fit_image, to_rgb_array

    rng = np.random.default_rng(3)
    for shape in ((64, 64, 3), (64, 64, 4), (64, 64)):
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        pil = Image.fromarray(arr).convert("RGB")
        np.testing.assert_array_equal(to_rgb_array(arr, 64), fit_image(pil, 64))
        assert to_rgb_array(arr, 64).flags.c_contiguous


@pytest.mark.parametrize("bad, needle", [
    (np.zeros((8, 8, 5), np.uint8), "shape"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((8, 8, 3), np.int32), "dtype"),
    ("/nonexistent.png", "nonexistent"),
    (42, "expected a path"),
])
def test_bad_images_are_clear_errors(pipe, bad, needle):
    with pytest.raises(InputError, match=needle):
        pipe.tokenize(bad)


def test_bad_text_is_a_clear_error(pipe, scenes):
    with pytest.raises(InputError, match="non-empty"):
        pipe.answer(scenes[0].image, "  ")
    with pytest.raises(InputError, match="max_new_tokens"):
        pipe.caption(scenes[0].image, max_new_tokens=0)


def _copy(bundle, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(bundle, dest)
    return dest


def test_tampered_file_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    data = bytearray((b / "encoder.onnx").read_bytes())
    data[-1] ^= 1
    (b / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="encoder.onnx.*sha256"):
        Pipeline.open(b)


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd"])
def test_paths_outside_the_bundle_are_refused(tiny_bundle, tmp_path, path):
    b = _copy(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["stages"][0]["file"] = path
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="inside the bundle"):
        Pipeline.open(b)


def test_symlink_out_of_the_bundle_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    (tmp_path / "elsewhere.onnx").write_bytes((b / "encoder.onnx").read_bytes())
    (b / "encoder.onnx").unlink()
    (b / "encoder.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(BundleError, match="outside the bundle"):
        Pipeline.open(b)


def test_unknown_schema_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema_version 99"):
        Pipeline.open(b)


def test_unknown_characters_and_long_prompts(pipe, scenes):
    vt = pipe.tokenize(scenes[0].image)
    assert isinstance(pipe.answer(vt, "ÿ 漢字 🙂 is there a red circle").text, str)  # unknown -> <unk>, no crash
    with pytest.raises(InputError, match="exceeds the context"):
        pipe.answer(vt, "red " * 400)


def test_manifest_io_must_match_the_graph(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    merger = next(s for s in m["stages"] if s["name"] == "merger")
    merger["outputs"][0]["name"] = "tokens_renamed"
    (b / "manifest.json").write_text(json.dumps(m))
    p = Pipeline.open(b)
    with pytest.raises(BundleError, match="merger.*does not match the manifest"):
        p.tokenize(np.zeros((64, 64, 3), np.uint8))


def test_the_context_can_be_capped_below_the_bundles(tiny_bundle):
    img = np.zeros((64, 64, 3), np.uint8)
    full = Pipeline.open(tiny_bundle, threads=1)
    assert full.max_context == M.load_manifest(tiny_bundle).text["max_positions"]
    capped = Pipeline.open(tiny_bundle, threads=1, max_context=24)
    assert capped.max_context == 24
    full.answer(img, "how many objects are there", max_new_tokens=20)
    with pytest.raises(InputError, match="exceeds the context of 24"):
        capped.answer(img, "how many objects are there", max_new_tokens=20)
