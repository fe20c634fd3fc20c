"""`setok train`: stage 1 trains the vision tokenizer (reconstruction + concept contrastive +
mask-guided grouping), stage 2 trains Setokim's LLM and heads on frozen vision tokens
(next-token loss, vision-token regression at <target> slots, token segmentation).

The data stream is a pure function of (seed, step), and optimizer state is checkpointed, so a
run killed and resumed with `--resume` sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from setok.config import EncoderConfig, SetokimConfig, preset
from setok.data.items import TrainItem, item_stream
from setok.errors import InputError
from setok.model import text as T
from setok.model.encoder import preprocess
from setok.model.losses import (
    ConceptContrast,
    grouping_loss,
    owner_tokens,
    patch_labels,
)
from setok.model.setokim import (
    CAPTION_PROMPT,
    DRAW_PROMPT,
    LOSS_NAMES,
    QUESTION_PROMPT,
    REFER_PROMPT,
    Setokim,
)
from setok.train.bank import attach_bank, bank_tokens
from setok.train.distributed import (
    Dist,
    agree,
    average_gradients,
    barrier,
    gather_cat,
    gather_objects,
    init_from_env,
    mean_scalar,
    shard,
    sum_counts,
    train_device,
)
from setok.train.palette import PALETTE_SCENES, colour_codebook
from setok.train.schedule import cosine_decay, lr_scale
from setok.train.sequences import batch_sequences
from setok.train.speed import compile_blocks, step_attention
from setok.train.tau import calibrate_tau

log = logging.getLogger(__name__)

PRESET_STEPS = {"tiny": (50, 70), "small": (800, 1200)}  # (stage 1, stage 2) steps
PRESET_BATCH = {"tiny": 16, "small": 32}
PRESET_LR = {"tiny": 2e-3, "small": 1e-3}
# Scenes tau is calibrated on. 256 for `small` was tried: tau 0.39, 4.6 tokens per image, fg_ari
# 0.760 -> 0.782 but VQA 0.667 -> 0.545 (fewer tokens, worse answers); the shipped run used 64.
TAU_SCENES = {"tiny": 64, "small": 64}
MERGER_LR_SCALE = 0.1  # stage 2 with --tune-merger: the merger's learning rate, relative


@dataclass
class TrainOptions:
    preset: str = "tiny"
    out: Path = Path("checkpoints/tiny")
    steps: int | None = None  # total steps; split between the stages like the preset
    seed: int = 0
    data: str = "synthetic"
    resume: bool = False
    tokenizer: str = "setok"
    ckpt_every: int = 200
    batch_size: int | None = None
    encoder_path: str | None = None
    llm_path: str | None = None
    freeze_encoder: bool = False  # the tower's weights stay as loaded (the merger and heads train)
    max_minutes: float | None = None  # wall-clock budget (baselines trained "for the same time")
    # Stage 2 also trains merger + detokenizer (clusters fixed: the encoder stays frozen), so the
    # LLM's losses shape what a token carries; reconstruction keeps the detokenizer in step.
    tune_merger: bool = False
    # A place head at the <target> slots (cell + position of each generated token, its own loss).
    place_head: bool = False
    # ...whose loss joins only the last place_steps stage-2 steps (None: all of them). From the first
    # step it dominated stage 2 and VQA fell 0.85 -> 0.78; added after the rest was learned, it
    # cost nothing (docs/generation.md "The place head").
    place_steps: int | None = 300
    # ...during which the head's own parameters learn at this constant rate (relative to the preset's;
    # None: the stage's cosine like the rest). The rest stays on the cosine: every parameter at a
    # constant 3e-4 there took VQA 0.85 -> 0.81 (docs/generation.md); from scratch at the cosine's
    # 2.4e-4 -> 1e-4 the head reached position 0.55 only.
    place_lr: float | None = 1.0
    # The last restart_steps stage-2 steps as a second cosine cycle (peak restart_lr x the preset's
    # rate, down to a tenth of it), the vision tokenizer frozen and the place head's loss on from the
    # cycle's first step (replacing place_steps / place_lr): `setok finetune`'s cycle inside the
    # budget (docs/generation.md "A second cycle"). None: one cosine.
    restart_steps: int | None = None
    restart_lr: float = 0.3
    # Where the steps run: "cpu", "cuda" / "cuda:N" or "auto"; under torchrun each rank takes
    # cuda:LOCAL_RANK. bf16 autocasts the forward passes (weights and optimizer stay float32).
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False  # torch.compile every transformer block (train/speed.py; ~1.5 min on a cold cache)
    palette: int | None = None  # the detokenizer's colour codes (None: the preset's)
    token_bank: int = 0  # real tokens for generation to snap to, drawn after the last step (0: none)


def autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in ("fp32", "bf16"):
        raise InputError(f"--precision {precision}: expected fp32 or bf16")
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, amp: torch.dtype | None):
    """The forward passes' autocast for `amp` (None: float32, no autocast)."""
    return contextlib.nullcontext() if amp is None else torch.autocast(device.type, dtype=amp)


def stage_steps(opts: TrainOptions) -> tuple[int, int]:
    s1, s2 = PRESET_STEPS[opts.preset]
    if opts.steps is None:
        return s1, s2
    if opts.steps < 2:
        raise InputError(f"--steps {opts.steps}: expected at least 2 (one per stage)")
    first = max(1, round(opts.steps * s1 / (s1 + s2)))
    return first, opts.steps - first


def train(opts: TrainOptions) -> Path:
    torch.manual_seed(opts.seed)
    cfg = preset(opts.preset, opts.tokenizer)
    if opts.encoder_path:
        cfg.encoder = tower_config(cfg.encoder, opts.encoder_path)  # image size, patch grid, normalisation
    cfg.encoder.freeze = opts.freeze_encoder
    cfg.place_head = opts.place_head
    if opts.palette is not None:
        if not 0 <= opts.palette <= 64:
            raise InputError(f"--palette {opts.palette}: expected 0 (off) to 64 colour codes")
        cfg.detokenizer.palette = opts.palette
    if opts.token_bank < 0:
        raise InputError(f"--token-bank {opts.token_bank}: expected 0 (none) or a number of tokens")
    if opts.place_steps is not None and opts.place_steps < 1:
        raise InputError(f"--place-steps {opts.place_steps}: expected at least 1 (the head would never train)")
    if opts.place_lr is not None and not 0 < opts.place_lr <= 10:
        raise InputError(f"--place-lr {opts.place_lr}: expected a scale of the preset learning rate in (0, 10]")
    if opts.restart_steps is not None and not 1 <= opts.restart_steps < stage_steps(opts)[1]:
        raise InputError(f"--restart-steps {opts.restart_steps}: expected 1 to {stage_steps(opts)[1] - 1} "
                         "(fewer than the stage-2 steps, so the first cycle has at least one)")
    if not 0 < opts.restart_lr <= 10:
        raise InputError(f"--restart-lr {opts.restart_lr}: expected a scale of the preset learning rate in (0, 10]")
    cfg.llm.hf_path = opts.llm_path
    state = _load_state(opts) if opts.resume else None
    if state is not None:
        model = Setokim.from_pretrained(opts.out)
        cfg = model.cfg
        opts.tune_merger = opts.tune_merger or bool(state.get("tune_merger"))  # the recipe the run began with
        opts.place_steps = state.get("place_steps", opts.place_steps)
        opts.place_lr = state.get("place_lr", opts.place_lr)
        opts.restart_steps = state.get("restart_steps", opts.restart_steps)
        opts.restart_lr = state.get("restart_lr", opts.restart_lr)
        log.info("resuming %s at stage %s step %s", opts.out, state["stage"], state["step"])
    stream = item_stream(opts.data, cfg.encoder.image_size, opts.seed)  # scenes at the tower's size
    if state is None:
        tok = (T.load_pretrained_tokenizer(opts.llm_path) if opts.llm_path
               else T.train_text_tokenizer(stream.corpus() + prompt_words(), cfg.llm.vocab_size))
        model = Setokim(cfg, tok, pretrained=True)
        state = {"stage": 1, "step": 0, "elapsed": 0.0}
    trainer = Trainer(model, opts, stream, state, init_from_env(opts.device))
    trainer.run()
    return opts.out


def tower_config(enc: EncoderConfig, path: str) -> EncoderConfig:
    """The encoder config for a Hugging Face tower: its image size, patch size, normalisation and
    config (stored, so the checkpoint is self-contained); the clustering width C stays setok's."""
    from setok.model.families import image_norm, read_config, vision_family

    config = read_config(path, "--encoder")
    family = vision_family(config["model_type"])
    mean, std = image_norm(path, family)
    size, patch = int(config["image_size"]), int(config["patch_size"])
    if size % patch:
        raise InputError(f"--encoder {path}: image_size {size} is not a multiple of patch_size {patch}")
    return dataclasses.replace(enc, hf_path=str(path), hf_config=config, image_size=size, patch_size=patch,
                               mean=mean, std=std)


def prompt_words() -> list[str]:
    """The prompts' fixed words, for the tokenizer: unseen, "question" and "answer" cost 13 ids."""
    templates = (CAPTION_PROMPT, QUESTION_PROMPT, REFER_PROMPT, DRAW_PROMPT)
    return [" ".join(re.sub(r"\{\w+\}", " ", t).split()) for t in templates]


def _load_state(opts: TrainOptions) -> dict | None:
    path = Path(opts.out) / "training_state.json"
    if not path.is_file():
        log.warning("--resume: no checkpoint in %s yet; starting from scratch", opts.out)
        return None
    state = json.loads(path.read_text())
    if state.get("finished"):
        raise InputError(f"--resume: {opts.out} holds a finished run; pass a new --out or more --steps")
    return state


class Trainer:
    def __init__(self, model: Setokim, opts: TrainOptions, stream, state: dict, dist: Dist | None = None):
        self.model, self.opts, self.stream, self.state, self.dist = model, opts, stream, state, dist or Dist()
        self.device = train_device(opts.device, self.dist)
        self.amp = autocast_dtype(opts.precision)
        self.model.to(self.device)
        if opts.compile:
            compile_blocks(self.model)
        self.cfg: SetokimConfig = model.cfg
        self.steps = stage_steps(opts)
        self.batch = opts.batch_size or PRESET_BATCH[opts.preset]
        self.lr = PRESET_LR[opts.preset]
        self.concept = ConceptContrast(self.cfg.merger.token_dim, len(model.tok)).to(self.device)
        if self.cfg.detokenizer.palette and not stream.has_masks:
            # The codes' cross-entropy reads each pixel's instance mask (a resumed palette run too).
            raise InputError("a --palette detokenizer trains on instance masks (the synthetic scenes); this data has none")
        self.opt = self._optimizer(state["stage"])
        if state["step"] > 0 or state["stage"] > 1:
            self._load_optimizer()
        elif self.cfg.detokenizer.palette:
            self._palette()

    def _palette(self) -> None:
        """The detokenizer's colour codes from a fixed set of training scenes, before step 0."""
        items = self.stream.batch(10**6 + 1, PALETTE_SCENES)
        codes = colour_codebook(items, self.cfg.encoder, self.cfg.detokenizer.palette)
        self.model.vision.detokenizer.codebook.copy_(codes.to(self.device))
        log.info("palette: %d colour codes from %d scenes", len(codes), len(items))

    def _optimizer(self, stage: int) -> torch.optim.Optimizer:
        if stage == 1:
            params = list(self.model.vision.parameters()) + list(self.concept.parameters())
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        self.model.vision.requires_grad_(False)
        frozen = ("vision.encoder.",) if self.opts.tune_merger else ("vision.",)
        if self.opts.tune_merger:
            self.model.vision.merger.requires_grad_(True)
            self.model.vision.detokenizer.requires_grad_(True)
        groups: dict[str, list] = {"rest": [], "merger": [], "place": []}
        for n, p in self.model.named_parameters():
            if not n.startswith(frozen):
                groups["merger" if n.startswith("vision.merger.") else "place" if n.startswith("place.") else "rest"].append(p)
        # The merger learns 10x slower in stage 2: through a still-random LLM its gradients are
        # noise, and at the full rate they erased what stage 1 taught (an MLP probe of object
        # shape from a token fell from 0.70 to 0.50 over stage 2; captions lost shapes).
        param_groups = [{"params": groups["rest"], "scale": 1.0}, {"params": groups["merger"], "scale": MERGER_LR_SCALE},
                        {"params": groups["place"], "scale": 1.0, "place": True}]
        return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=self.lr, weight_decay=0.01)

    def run(self) -> None:
        from tqdm.auto import tqdm

        total = sum(self.steps)
        done = self.state["step"] + (self.steps[0] if self.state["stage"] == 2 else 0)
        bar = tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True, disable=not self.dist.main)
        start = time.monotonic() - self.state["elapsed"]
        with step_attention(self.model.llm, self.device, self.amp):
            self._steps(bar, start)
        bar.close()
        self.save(final=True)

    def _steps(self, bar, start: float) -> None:
        while self.state["stage"] <= 2:
            stage, step = self.state["stage"], self.state["step"]
            if step >= self.steps[stage - 1] or self._out_of_time(start):
                self._next_stage()
                continue
            losses = self.step_stage1(step) if stage == 1 else self.step_stage2(step)
            lr = self._lrs()
            self.state["step"] += 1
            self.state["elapsed"] = time.monotonic() - start
            self.state.setdefault("history", []).append({"stage": stage, "step": step, **lr, **losses})
            del self.state["history"][:-5000]  # bounded: the last 5000 steps' losses
            bar.update(1)
            bar.set_postfix(stage=stage, **{k: f"{v:.3f}" for k, v in losses.items()})
            if self.state["step"] % self.opts.ckpt_every == 0:
                self.save(final=False)

    def _out_of_time(self, start: float) -> bool:
        if self.opts.max_minutes is None:
            return False
        # Each stage gets its share of the budget, like it gets its share of the steps.
        share = self.steps[0] / sum(self.steps) if self.state["stage"] == 1 else 1.0
        return agree(time.monotonic() - start > 60.0 * self.opts.max_minutes * share, self.dist)

    def _next_stage(self) -> None:
        if self.state["stage"] == 1:
            self._calibrate()
        self.state["stage"] += 1
        self.state["step"] = 0
        if self.state["stage"] == 2:
            self.opt = self._optimizer(2)

    def _calibrate(self) -> None:
        if self.cfg.tokenizer != "setok" or not self.stream.has_masks:
            return
        items = self.stream.batch(10**6, TAU_SCENES[self.opts.preset])  # a fixed set from training seeds
        tau = calibrate_tau(self.model.vision, items, self.cfg)
        log.info("calibrated tau: %.4f -> %.4f", self.cfg.cluster.tau, tau)
        self.cfg.cluster.tau = tau

    # ---- stage 1 ---------------------------------------------------------------------------
    def step_stage1(self, step: int) -> dict[str, float]:
        if step > 0 and step % max(1, self.steps[0] // 4) == 0:
            self._calibrate()  # keep tau matched to the moving features
        items = shard(self.stream.batch(step, self.batch), self.dist)
        px = self._pixels(items)
        with self._autocast():
            vt = self.model.vision(px)
            masks = self._masks(items)
            losses = {"recon": self.model.vision.reconstruction_loss(vt, px, masks)}
            if masks is not None:
                labels = patch_labels(masks, self.cfg.encoder.patch_size)
                losses["group"] = grouping_loss(vt.content, labels)
                losses["concept"] = self._concept_loss(vt, items, labels)
            else:
                losses["concept"] = self._caption_contrast(vt, items)
        return self._apply(losses)

    def _masks(self, items: list[TrainItem]) -> torch.Tensor | None:
        if not self.stream.has_masks:
            return None
        return torch.from_numpy(np.stack([it.instance_mask for it in items])).to(self.device)  # (B, H, W)

    def _pixels(self, items: list[TrainItem]) -> torch.Tensor:
        images = torch.from_numpy(np.stack([it.image for it in items]))  # (B, H, W, 3) uint8 on the host
        return preprocess(images.to(self.device, non_blocking=True), self.cfg.encoder)

    def _autocast(self):
        return autocast(self.device, self.amp)

    def _concept_loss(self, vt, items: list[TrainItem], labels: torch.Tensor) -> torch.Tensor:
        owners = owner_tokens(vt.clusters.assignment, labels, [len(it.concepts) for it in items])
        vecs, ids, names = [], [], []
        for (b, t), concept in zip(owners, [c for it in items for c in it.concepts]):
            if t >= 0:
                vecs.append(vt.tokens[b, t])
                ids.append(self.model.encode_text(concept))
                names.append(concept)
        return self._contrast(torch.stack(vecs), ids, names)

    def _contrast(self, vecs: torch.Tensor, ids: list[list[int]], names: list[str]) -> torch.Tensor:
        """The contrastive loss over the global batch: every rank's embeddings are negatives."""
        all_ids = [x for part in gather_objects(ids, self.dist) for x in part]
        all_names = [x for part in gather_objects(names, self.dist) for x in part]
        return self.concept(gather_cat(vecs, self.dist), all_ids, all_names)

    def _caption_contrast(self, vt, items: list[TrainItem]) -> torch.Tensor:
        """Without masks, the whole caption is the concept of the mean token of the image."""
        valid = (torch.arange(vt.tokens.shape[1], device=vt.tokens.device) < vt.clusters.num_tokens.unsqueeze(1)).float()
        pooled = (vt.tokens * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)
        names = [it.caption for it in items]
        return self._contrast(pooled, [self.model.encode_text(n) for n in names], names)

    # ---- stage 2 ---------------------------------------------------------------------------
    def step_stage2(self, step: int) -> dict[str, float]:
        indexed = shard(list(enumerate(self.stream.batch(self.steps[0] + step, self.batch))), self.dist)
        px = self._pixels([it for _, it in indexed])
        extra = {}
        with self._autocast():
            if self.opts.tune_merger and not self._restarted(step):  # the second cycle keeps the tokens fixed
                vt = self.model.vision(px, encoder_grad=False)
                extra["recon"] = self.model.vision.reconstruction_loss(vt, px, self._masks([it for _, it in indexed]))
            else:
                with torch.no_grad():
                    vt = self.model.vision(px)
            # One generator per image of the global batch: the same draws however it is sharded.
            rngs = [random.Random((self.opts.seed * 1_000_003 + step) * 10_007 + g) for g, _ in indexed]
            seqs = batch_sequences(self.model, [it for _, it in indexed], vt, rngs)
            losses = {**self._global_means(seqs), **extra}
        if not self._place_on(step):
            losses.pop("place", None)
        return self._apply(losses)

    def _place_on(self, step: int) -> bool:
        if self.opts.restart_steps is not None:
            return self._restarted(step)
        last = self.opts.place_steps
        return last is None or step >= self.steps[1] - last

    def _restart_start(self) -> int | None:
        """The stage-2 step the second cycle begins at (None: one cycle)."""
        return None if self.opts.restart_steps is None else self.steps[1] - self.opts.restart_steps

    def _restarted(self, step: int) -> bool:
        start = self._restart_start()
        return start is not None and step >= start

    def _global_means(self, seqs) -> dict[str, torch.Tensor]:
        """Each rank's loss sum over the global count, times the world size: averaged gradients
        and reported values then equal one process's on the whole batch (a per-rank mean would
        weigh a rank's few referring tokens like the other rank's many)."""
        sums, counts = self.model.loss_sums(seqs)
        total = sum_counts(counts, LOSS_NAMES, self.dist)
        zero = next(iter(sums.values())) * 0.0  # a rank without a loss still joins the all-reduce
        return {n: sums.get(n, zero) * self.dist.world / total[n] for n in LOSS_NAMES if total[n]}

    def _lr_scale(self, group: dict) -> float:
        """The learning rate of `group` relative to the preset's at this step."""
        stage, step, total = self.state["stage"], self.state["step"], self.steps[self.state["stage"] - 1]
        start = self._restart_start()
        if stage == 2 and start is not None:
            if step < start:
                return lr_scale(step, start) * group.get("scale", 1.0)
            return self.opts.restart_lr * cosine_decay((step - start) / self.opts.restart_steps)  # vision has no gradients
        if stage == 2 and group.get("place") and self.opts.place_lr is not None:
            return self.opts.place_lr  # the head trains only in its last place_steps steps, at a constant rate
        return lr_scale(step, total) * group.get("scale", 1.0)

    def _lrs(self) -> dict[str, float]:
        """For the history: the rates the last step ran at (the first group's; the place head's own)."""
        out = {"lr": self.opt.param_groups[0]["lr"]}
        out.update(("lr_place", g["lr"]) for g in self.opt.param_groups if g.get("place"))
        return out

    def _apply(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        for group in self.opt.param_groups:
            group["lr"] = self.lr * self._lr_scale(group)
        total = sum(losses.values())
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        average_gradients(params, self.dist)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()
        return {k: mean_scalar(float(v.detach()), self.dist) for k, v in losses.items()}

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, final: bool) -> None:
        if not self.dist.main:  # rank 0 writes; the others wait so nobody reads a half-saved step
            barrier(self.dist)
            return
        if final and self.opts.token_bank:
            attach_bank(self.model, bank_tokens(self.model, self.stream, self.opts.token_bank, seed=self.opts.seed, strict=False))
        state = dict(self.state, finished=final, preset=self.opts.preset, seed=self.opts.seed,
                     data=self.opts.data, steps=list(self.steps), tune_merger=self.opts.tune_merger,
                     place_steps=self.opts.place_steps, place_lr=self.opts.place_lr, precision=self.opts.precision,
                     restart_steps=self.opts.restart_steps, restart_lr=self.opts.restart_lr,
                     compile=self.opts.compile)
        self.model.save_pretrained(self.opts.out, extra=state, optimizer=None if final else self._opt_tensors())
        log.info("checkpoint: %s (stage %s step %s)", self.opts.out, state["stage"], state["step"])
        barrier(self.dist)

    def _opt_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer's moments keyed by parameter name (`opt.<param>.<stat>`), not by position:
        a resumed run whose optimizer groups its parameters differently still gets each its own."""
        flat = {}
        names = self._param_names()
        for p, st in self.opt.state.items():
            for stat, value in st.items():
                flat[f"opt.{names[id(p)]}.{stat}"] = torch.as_tensor(value).contiguous()
        for name, p in self.concept.state_dict().items():
            flat[f"concept.{name}"] = p.contiguous()
        return flat

    def _param_names(self) -> dict[int, str]:
        named = [*self.model.named_parameters(), *(("concept." + n, p) for n, p in self.concept.named_parameters())]
        return {id(p): n for n, p in named}

    def _load_optimizer(self) -> None:
        from safetensors.torch import load_file

        path = Path(self.opts.out) / "optimizer.safetensors"
        if not path.is_file():
            return
        flat = load_file(str(path))
        self.concept.load_state_dict({k[8:]: v for k, v in flat.items() if k.startswith("concept.")})
        saved: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            if key.startswith("opt."):
                where, stat = key[4:].rsplit(".", 1)
                saved.setdefault(where, {})[stat] = value
        params = [p for g in self.opt.param_groups for p in g["params"]]
        names = self._param_names()
        by_name = {names[id(p)]: p for p in params if id(p) in names}
        # Checkpoints before names keyed the moments by position in the optimizer's groups.
        by_key = {str(i): p for i, p in enumerate(params)} if all(k.isdigit() for k in saved) else by_name
        skipped = {k for k, st in saved.items() if k not in by_key or st["exp_avg"].shape != by_key[k].shape}
        for key, st in saved.items():
            if key not in skipped:
                self.opt.state[by_key[key]] = {k: v.to(by_key[key].device) if k != "step" else v for k, v in st.items()}
        if skipped:
            log.warning("resume: %d saved optimizer states match no parameter of this run's optimizer (they start "
                        "fresh): %s", len(skipped), ", ".join(sorted(skipped)[:5]))
