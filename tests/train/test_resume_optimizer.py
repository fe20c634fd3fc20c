"""`--resume` gives every parameter its own Adam moments back: keyed by parameter name, so a run
whose optimizer groups its parameters in another order still gets each its own; and checkpoints
from before names (moments keyed by position in the optimizer's groups) still load."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from setok.config import preset
from setok.data.items import item_stream
from setok.model import text as T
from setok.model.setokim import Setokim
from setok.train.trainer import Trainer, TrainOptions, prompt_words


class RegroupedTrainer(Trainer):
    """A later version's trainer: the same parameters, its stage-2 groups in the reverse order."""

    def _optimizer(self, stage: int) -> torch.optim.Optimizer:
        opt = super()._optimizer(stage)
        return torch.optim.AdamW(opt.param_groups[::-1], lr=self.lr, weight_decay=0.01)


def _trained(out: Path) -> Trainer:
    """A tiny run two stage-2 steps in (tune-merger: three optimizer groups), checkpointed mid-run."""
    torch.manual_seed(0)
    opts = TrainOptions(preset="tiny", out=out, steps=12, tune_merger=True, ckpt_every=1000)
    stream = item_stream("synthetic", 64, 0)
    model = Setokim(preset("tiny"), T.train_text_tokenizer(stream.corpus() + prompt_words(), 512), pretrained=True)
    trainer = Trainer(model, opts, stream, {"stage": 2, "step": 0, "elapsed": 0.0})
    for step in range(2):
        trainer.step_stage2(step)
        trainer.state["step"] += 1
    trainer.save(final=False)
    return trainer


def _resumed(out: Path, cls=Trainer) -> Trainer:
    model = Setokim.from_pretrained(out)
    opts = TrainOptions(preset="tiny", out=out, steps=12, tune_merger=True, resume=True)
    return cls(model, opts, item_stream("synthetic", 64, 0), {"stage": 2, "step": 2, "elapsed": 0.0})


def _order(trainer: Trainer) -> list[str]:
    names = trainer._param_names()
    return [names[id(p)] for g in trainer.opt.param_groups for p in g["params"]]


def _moments(trainer: Trainer) -> dict[str, torch.Tensor]:
    names = trainer._param_names()
    return {names[id(p)]: st["exp_avg"] for p, st in trainer.opt.state.items()}


def test_resume_with_regrouped_optimizer_matches_by_name(tmp_path):
    trainer = _trained(tmp_path / "ck")
    want = _moments(trainer)
    assert len(want) > 10 and any(n.startswith("vision.merger.") for n in want)
    resumed = _resumed(tmp_path / "ck", RegroupedTrainer)
    assert _order(resumed) != _order(trainer) and sorted(_order(resumed)) == sorted(_order(trainer))
    got = _moments(resumed)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_resume_from_a_positional_optimizer_file(tmp_path):
    trainer = _trained(tmp_path / "ck")
    want = _moments(trainer)
    # Rewrite the file as checkpoints before names did: `opt.<index in the groups>.<stat>`.
    path = tmp_path / "ck" / "optimizer.safetensors"
    flat = load_file(str(path))
    names = trainer._param_names()
    index = {names[id(p)]: i for i, p in enumerate(p for g in trainer.opt.param_groups for p in g["params"])}
    old = {}
    for key, value in flat.items():
        if key.startswith("opt."):
            name, stat = key[4:].rsplit(".", 1)
            old[f"opt.{index[name]}.{stat}"] = value
        else:
            old[key] = value
    save_file(old, str(path))
    got = _moments(_resumed(tmp_path / "ck"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
