"""The stage registry is data: a new stage needs nothing but its registry entry, and every
registered stage is exported, validated, linted and run through the runtime."""

import numpy as np
import pytest
import torch
from torch import nn

from setok import manifest as M
from setok.backends.decode import prefill_feeds
from setok.backends.trt.lint import lint_bundle
from setok.export.onnx import export_bundle
from setok.export.stages import COMPARE, F32, STAGES, Stage, flow, io, register
from setok.export.validate import ValidationError
from setok.model.setokim import Setokim
from setok.runtime import Pipeline


class TokenNorm(nn.Module):
    """A toy stage: unit-length vision tokens, scaled."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        return self.scale * vision_tokens / vision_tokens.norm(dim=-1, keepdim=True)


def _width(m):
    return ("tokens", m.cfg.merger.token_dim)


def toy(validated: list, scale: float = 2.0) -> Stage:
    def validate(stage, model, path, example):
        validated.append(stage.name)
        return COMPARE(stage, model, path, example)

    return Stage("token_norm", io({M.VISION_TOKENS: (F32, _width)}, {"unit_tokens": (F32, _width)}),
                 lambda f: {M.VISION_TOKENS: f.tokens[0, :f.k]}, lambda m: TokenNorm(scale), validate=validate)


def test_a_toy_stage_is_exported_validated_listed_and_run(tiny_ckpt, tmp_path):
    registry, validated = dict(STAGES), []
    register(toy(validated), registry)
    assert "token_norm" not in STAGES, "the package's registry is untouched"
    bundle = export_bundle(tiny_ckpt, tmp_path / "b", stages=registry)
    assert validated == ["token_norm"]
    entry = M.load_manifest(bundle).stage("token_norm")
    assert entry.file == "token_norm.onnx" and [t.name for t in entry.outputs] == ["unit_tokens"]
    tokens = np.random.default_rng(0).normal(size=(5, entry.inputs[0].shape[1])).astype(np.float32)
    got = Pipeline.open(bundle).stage("token_norm").run({M.VISION_TOKENS: tokens})["unit_tokens"]
    np.testing.assert_allclose(got, 2 * tokens / np.linalg.norm(tokens, axis=-1, keepdims=True), rtol=1e-5)


def test_a_toy_stage_that_disagrees_fails_its_validation(tiny_ckpt, tmp_path):
    model = Setokim.from_pretrained(tiny_ckpt)
    st, other = toy([], scale=2.0), toy([], scale=3.0)
    example = st.example(flow(model))
    path = st.export(st, model, tmp_path, 17, example)
    with pytest.raises(ValidationError, match="token_norm.*unit_tokens"):
        other.validate(other, model, path, example)


def _runtime_feeds(st: Stage, entry: M.StageEntry, example: dict) -> dict[str, np.ndarray]:
    if example:
        return {k: v.numpy() for k, v in example.items()}
    # A stage whose validator draws its own inputs (the llm): a prefill of random embeddings.
    width = entry.inputs[0].shape[2]
    return prefill_feeds(entry, np.random.default_rng(0).normal(size=(1, 6, width)).astype(np.float32))


def test_every_registered_stage_is_exported_validated_linted_and_run(tiny_ckpt, tiny_bundle):
    model = Setokim.from_pretrained(tiny_ckpt)
    manifest, ex = M.load_manifest(tiny_bundle), flow(model)
    findings = lint_bundle(tiny_bundle)
    pipe = Pipeline.open(tiny_bundle, threads=1)
    for st in (s for s in STAGES.values() if s.applies(model.cfg)):
        entry = manifest.stage(st.name)
        example = st.example(ex)
        st.validate(st, model, tiny_bundle / entry.file, example)  # the bundle's file against PyTorch
        assert not [f for f in findings if f.stage == st.name and f.severity == "error"], st.name
        out = pipe.stage(st.name).run(_runtime_feeds(st, entry, example))
        assert list(out) == [t.name for t in entry.outputs], st.name
        assert all(np.all(np.isfinite(v)) for v in out.values()), st.name
    assert [s.name for s in manifest.stages] == [s.name for s in STAGES.values() if s.applies(model.cfg)]
