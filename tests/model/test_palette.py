"""The detokenizer's discrete colour decoder (`DetokenizerConfig.palette`): codes found in the data,
pixels painted as a code's exact colour or the regression's, its loss, and its export."""

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from setok import manifest as M
from setok.config import preset
from setok.data.items import eval_items, item_stream
from setok.data.scenes import COLORS
from setok.errors import InputError
from setok.model.encoder import preprocess
from setok.model.losses import reconstruction_loss
from setok.model.setokim import Setokim
from setok.model.text import train_text_tokenizer
from setok.train.palette import colour_codebook


def palette_model(codes: int = 8) -> Setokim:
    cfg = preset("tiny")
    cfg.detokenizer = dataclasses.replace(cfg.detokenizer, palette=codes)
    stream = item_stream("synthetic", cfg.encoder.image_size, 0)
    model = Setokim(cfg, train_text_tokenizer(stream.corpus(), cfg.llm.vocab_size)).eval()
    detok = model.vision.detokenizer
    detok.codebook.copy_(colour_codebook(stream.batch(0, 64), cfg.encoder, codes))
    torch.manual_seed(0)
    torch.nn.init.normal_(detok.codes.weight, std=2.0)  # a trained head's mix of classes, not step 0's background
    return model


def test_codebook_finds_each_object_colour_from_the_data():
    cfg = preset("tiny").encoder
    codes = colour_codebook(item_stream("synthetic", 64, 0).batch(0, 128), cfg, len(COLORS))
    truth = (torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255 - 0.5) / 0.5  # the generator's, normalised
    near = torch.cdist(truth, codes)  # (colours, codes)
    assert sorted(near.argmin(1).tolist()) == list(range(len(COLORS)))  # one code per colour
    assert near.min(1).values.max() < 0.05


def test_codebook_refuses_data_without_masks():
    items = item_stream("synthetic", 64, 0).batch(0, 4)
    items[1].instance_mask = None
    with pytest.raises(InputError, match="--palette needs instance masks"):
        colour_codebook(items, preset("tiny").encoder, 8)


def test_every_pixel_is_a_code_colour_or_the_regressions_and_step_0_is_the_regression():
    model = palette_model()
    detok = model.vision.detokenizer
    px = preprocess(torch.from_numpy(np.stack([it.image for it in eval_items(3, seed=2)])))
    with torch.no_grad():
        vt = model.vision(px)
        rgb, logits = detok.paint(vt.tokens, vt.clusters.num_tokens)
        image = detok(vt.tokens, vt.clusters.num_tokens)
    cls = logits.argmax(1)  # (B, H, W)
    assert 0.05 < (cls > 0).float().mean() < 0.95  # both kinds of pixel are present
    code = detok.codebook[(cls - 1).clamp_min(0)].permute(0, 3, 1, 2)
    assert torch.equal(image, torch.where((cls > 0).unsqueeze(1), code, rgb))
    torch.nn.init.zeros_(detok.codes.weight)  # the head as it starts: background everywhere
    with torch.no_grad():
        assert torch.equal(detok(vt.tokens, vt.clusters.num_tokens), rgb)


def test_reconstruction_loss_adds_the_pixel_classes_cross_entropy():
    codebook = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    pixels = torch.full((1, 3, 2, 2), -0.5)
    pixels[0, :, 0, 0] = torch.tensor([0.9, -0.9, -0.9])  # a red object pixel
    masks = torch.tensor([[[1, 0], [0, 0]]])
    rgb = pixels.clone()  # a perfect regression: only the classes cost
    right = torch.full((1, 3, 2, 2), -9.0)
    right[0, 0] = 9.0  # background everywhere ...
    right[0, :, 0, 0] = torch.tensor([-9.0, 9.0, -9.0])  # ... but code 1 (red) at the object pixel
    wrong = right.clone()
    wrong[0, :, 0, 0] = torch.tensor([-9.0, -9.0, 9.0])  # blue there
    assert reconstruction_loss(rgb, right, pixels, codebook, masks) < 1e-6
    # One of four pixels wrong by a logit margin of 18: the mean cross-entropy is 18 / 4.
    assert abs(float(reconstruction_loss(rgb, wrong, pixels, codebook, masks)) - 18 / 4) < 1e-3
    assert reconstruction_loss(rgb, None, pixels) == 0


@pytest.fixture(scope="module")
def palette_export(tmp_path_factory):
    """A palette model and its bundle (export validates every stage against PyTorch)."""
    from setok.export.onnx import export_bundle

    root = tmp_path_factory.mktemp("palette")
    model = palette_model()
    model.save_pretrained(root / "ck")
    return model, export_bundle(root / "ck", root / "bundle")


def test_a_palette_detokenizer_exports_and_onnx_runtime_paints_the_same_pixels(palette_export):
    model, bundle = palette_export
    px = preprocess(torch.from_numpy(np.stack([it.image for it in eval_items(2, seed=4)])))
    with torch.no_grad():
        vt = model.vision(px)
        want = model.vision.reconstruct(vt).numpy()
    sess = ort.InferenceSession(str(bundle / "detokenizer.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run([M.IMAGE], {M.VISION_TOKENS: vt.tokens.numpy(), M.NUM_TOKENS: vt.clusters.num_tokens.numpy()})[0]
    assert np.abs(got - want).max() < 1e-4
    codes = model.vision.detokenizer.codebook.numpy()  # (k, 3)
    painted = np.isclose(got.transpose(0, 2, 3, 1)[..., None, :], codes).all(-1).any(-1)  # (B, H, W)
    assert 0.05 < painted.mean() < 0.95  # the graph paints codes and regressed pixels both


def test_the_palette_graph_takes_only_types_tensorrt_lists_for_its_ops(palette_export):
    """The codes are looked up by the argmax class itself: integer arithmetic on the indices was an
    INT64 Clip in the graph, a type TensorRT's Clip does not list."""
    from setok.backends.trt.lint import lint_bundle

    bundle = palette_export[1]
    detok = [f for f in lint_bundle(bundle) if f.stage == "detokenizer"]
    assert not [f for f in detok if f.severity == "error" or "not in the table's types" in f.message], detok


def test_a_resumed_palette_run_on_data_without_masks_is_refused(tmp_path):
    """The codes' cross-entropy reads instance masks: a palette checkpoint resumed on a captions folder
    stops before its first step (a fresh run is refused by colour_codebook, before step 0)."""
    from PIL import Image

    from setok.train.trainer import Trainer, TrainOptions

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(folder / "a.png")
    (folder / "captions.jsonl").write_text('{"image": "a.png", "text": "a red photo"}\n')
    stream = item_stream(str(folder), 64, 0)
    with pytest.raises(InputError, match="--palette detokenizer trains on instance masks"):
        Trainer(palette_model(4), TrainOptions(out=tmp_path / "x"), stream, {"stage": 1, "step": 200, "elapsed": 0.0})
