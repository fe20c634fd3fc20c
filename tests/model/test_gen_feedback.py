"""gen_feedback: each <target> slot after the first also reads the token drawn at the slot before.
Training feeds the true tokens (teacher forcing), decoding feeds its own; both paths must put the
same token into the same slot, in PyTorch and in the runtime."""

import json
import shutil

import numpy as np
import torch

from setok.config import SHIPPED_CHECKPOINT
from setok.eval.evaluation import to_unit
from setok.eval.metrics import psnr
from setok.model import text as T
from setok.model.setokim import Setokim, TokenHead

CAPTION = "a large red circle at center and a small blue square at top left on a navy gradient"


def _model(feedback: bool) -> Setokim:
    m = Setokim.from_pretrained(SHIPPED_CHECKPOINT).eval()
    m.cfg.gen_feedback = feedback
    return m


def _drawing(m: Setokim, caption: str, targets: torch.Tensor):
    seq = m.generation_prefix(caption)
    seq.add([m.ids[T.IM_START]] + [m.ids[T.TARGET]] * len(targets) + [m.ids[T.IM_END]])
    seq.targets = targets
    return seq


def test_teacher_forcing_adds_the_previous_true_token_to_every_target_slot_but_the_first():
    m = _model(True)
    targets = torch.randn(5, m.cfg.merger.token_dim)
    with torch.no_grad():
        fed = m.collate([_drawing(m, CAPTION, targets)])
        m.cfg.gen_feedback = False
        plain = m.collate([_drawing(m, CAPTION, targets)])
        slots = (fed.ids[0] == m.ids[T.TARGET]).nonzero()[:, 0]
        want = plain.embeds[0, slots[1:]] + m.projector(targets[:-1])
    np.testing.assert_allclose(fed.embeds[0, slots[1:]], want, atol=1e-5)
    others = torch.ones(fed.ids.shape[1], dtype=torch.bool)
    others[slots[1:]] = False
    assert torch.equal(fed.embeds[0, others], plain.embeds[0, others])  # slot 0 and the text as before


def test_decoding_feeds_back_what_teacher_forcing_feeds_for_the_same_tokens():
    """Greedy decoding with feedback, then the decoded ids teacher-forced with the decoded tokens as
    targets: every slot's hidden state gives the decoded token again (an off-by-one in either path
    would feed token j - 2 or j and change them)."""
    m = _model(True)
    with torch.no_grad():
        (ids,), (hs,) = m.greedy([m.generation_prefix(CAPTION)], m.cfg.max_tokens + 3, keep_hidden=True, feedback=True)
        slots = [h for tok, h in zip(ids, hs) if tok == m.ids[T.TARGET]]
        assert len(slots) >= 3, ids
        tokens = TokenHead(m)(torch.stack(slots))
        seq = m.generation_prefix(CAPTION).add(ids[: len(hs)])
        seq.targets = tokens
        batch = m.collate([seq])
        _, hidden = m.hidden(batch)
        again = TokenHead(m)(hidden[0][batch.ids[0] == m.ids[T.TARGET]])
        np.testing.assert_allclose(again, tokens, atol=1e-4)
        drawn, counts = m.generate_tokens([CAPTION])
        k = int(counts[0])
        np.testing.assert_allclose(drawn[0, :k], tokens[:k], atol=1e-5)
        m.cfg.gen_feedback = False  # the check can fail: without feedback the slots draw otherwise
        other, _ = m.generate_tokens([CAPTION])
    assert not torch.allclose(other[0, :k], drawn[0, :k], atol=1e-2)


def test_the_runtime_draws_what_pytorch_draws_with_and_without_feedback(shipped_bundle, tmp_path):
    """The runtime reads gen_feedback from the manifest's config: the shipped bundle, and the same
    bundle with the setting flipped (its graphs are the same ones), each against PyTorch."""
    from setok.runtime import Pipeline

    flipped = tmp_path / "flipped"
    shutil.copytree(shipped_bundle, flipped)
    manifest = json.loads((flipped / "manifest.json").read_text())
    shipped_setting = bool(manifest["config"].get("gen_feedback", False))
    manifest["config"]["gen_feedback"] = not shipped_setting
    (flipped / "manifest.json").write_text(json.dumps(manifest))
    images = {}
    for bundle, feedback in ((shipped_bundle, shipped_setting), (flipped, not shipped_setting)):
        m = _model(feedback)
        with torch.no_grad():
            want = to_unit(m.vision.detokenizer(*m.generate_tokens([CAPTION])))[0]
        with Pipeline.open(bundle, threads=1) as pipe:
            got = pipe.generate_image(CAPTION)
        assert got.num_tokens == int(m.generate_tokens([CAPTION])[1][0])
        assert psnr(want, got.image.astype(np.float64) / 255) > 40
        images[feedback] = got.image
    assert not np.array_equal(images[True], images[False])
