"""Setokim: the vision tokenizer + a Hugging Face decoder LLM reading vision tokens through
`inputs_embeds`, with three heads: text (the LM head), vision-token regression at `<target>`
slots (text -> image) and a segmentation head that scores vision tokens for an expression.

Sequences (one per image and task):
  caption  <bos> <im_start> V.. <im_end> caption           -> caption <eos>
  answer   <bos> question Q <im_start> V.. <im_end> answer -> A <eos>
  refer    <bos> find E <im_start> V.. <im_end>            (last hidden state scores each V)
  generate <bos> draw CAPTION -> <im_start> <target>.. <im_end> <eos>  (hidden at <target> -> V;
           with cfg.gen_feedback, <target> j > 0 also reads V j - 1 through the projector)

The question (and the expression) come before the image so that every vision token is read
knowing what is asked: with the question after the image, a 4-layer LLM must find the object
named in the question and compare it with another in the few layers left after reading it
(colour-of-shape 0.64, left-of 0.41 on held-out scenes; question first: 0.90 and 0.60).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setok.config import SetokimConfig
from setok.errors import CheckpointError
from setok.io import atomic_dir
from setok.manifest import split_prompt
from setok.model import text as T
from setok.model.bank import TokenBank
from setok.model.vision import VisionTokenizer

# Templates; {image} is where the vision tokens go (see setok.manifest.split_prompt).
CAPTION_PROMPT = "{image} caption"
QUESTION_PROMPT = "question {q} {image} answer"
REFER_PROMPT = "find {e} {image}"
DRAW_PROMPT = "draw {c}"
LOSS_NAMES = ("lm", "regress", "seg", "place")  # Setokim.loss_sums' keys, in this order
CELLS = 3  # the place head's grid per axis (the scenes' 3x3 positions)
PLACE_OFFSET_WEIGHT = 10.0  # (x, y) in [0, 1]: squared errors ~0.01 against a cross-entropy ~1


@dataclass
class Sequence:
    """One training/inference sequence: token ids with -1 where vision tokens go."""

    ids: list[int] = field(default_factory=list)
    supervised: list[bool] = field(default_factory=list)  # predict ids[t] from the prefix
    vision: Tensor | None = None  # (K, D) placed at the -1 slots
    targets: Tensor | None = None  # (K, D) regressed from hidden states at <target> slots
    seg_labels: Tensor | None = None  # (K,) 1 = token belongs to the referred object

    def add(self, ids: list[int], supervised: bool = False) -> Sequence:
        self.ids += ids
        self.supervised += [supervised] * len(ids)
        return self


@dataclass
class Batch:
    embeds: Tensor  # (S, L, H)
    attention_mask: Tensor  # (S, L)
    position_ids: Tensor  # (S, L)
    ids: Tensor  # (S, L), -1 at vision slots and padding
    supervised: Tensor  # (S, L) bool
    lengths: list[int]
    seqs: list[Sequence]


def build_llm(cfg: SetokimConfig, tok, pretrained: bool = False) -> nn.Module:
    """The built-in Llama from cfg.llm, or a Hugging Face family's LLM (model/families.py): from
    its stored config (a checkpoint's), or at the start of training with the weights of
    cfg.llm.hf_path, its vocabulary grown by the tokens setok adds (only their rows initialised)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from setok.model.families import build_causal_lm, read_config, require_dir

    c = cfg.llm
    if pretrained and c.hf_path:
        llm = build_causal_lm(read_config(c.hf_path, "--llm"), pretrained=c.hf_path)
        T.grow_vocab(llm, tok)
        c.hf_config = T.plain_config(llm)
        return llm
    if c.hf_config:
        return build_causal_lm(c.hf_config)
    if c.hf_path:  # a checkpoint from before configs were stored: as it was built then
        llm = build_causal_lm(read_config(require_dir(c.hf_path, "LLM"), "--llm"))
        llm.resize_token_embeddings(len(tok))
        return llm
    conf = LlamaConfig(
        vocab_size=len(tok), hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(conf)


class Projector(nn.Module):
    """Vision token (D) -> LLM width. A token's dims 0-1 are its centroid (x, y) (see Merger);
    they also enter on their own path, centred and scaled, with sin/cos features: as 2 of D
    plain inputs in [0, 1] the LLM did not learn to read x (left-of questions at chance, 0.48,
    while above-questions, answerable from the tokens' raster order, reached 0.76). The path
    starts at zero so it adds position only as fast as it is useful."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.register_buffer("freqs", torch.pi * torch.tensor([0.5, 1.0, 2.0, 4.0]), persistent=False)
        self.where = nn.Linear(2 + 4 * self.freqs.numel(), hidden)
        nn.init.zeros_(self.where.weight)
        nn.init.zeros_(self.where.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """(K, D) -> (K, H)."""
        xy = tokens[:, :2]  # (K, 2)
        phase = xy[:, :, None] * self.freqs  # (K, 2, F)
        code = torch.cat([4.0 * (xy - 0.5), phase.sin().flatten(1), phase.cos().flatten(1)], -1)  # (K, 2 + 4F)
        return self.mlp(tokens) + self.where(code)


class SegHead(nn.Module):
    """The seg_head stage: each vision token's hidden state scored against the expression's last
    hidden state (Setokim.segment_tokens does the same inside its batch)."""

    def __init__(self, model: Setokim):
        super().__init__()
        self.q, self.k = model.seg_query, model.seg_key

    def forward(self, query_hidden: Tensor, token_hidden: Tensor) -> Tensor:
        q = self.q(query_hidden).unsqueeze(-1)  # (B, H) -> (B, H, 1)
        return (self.k(token_hidden) @ q).squeeze(-1) / q.shape[1] ** 0.5  # (B, K, H) @ (B, H, 1) -> (B, K)


class PlaceHead(nn.Module):
    """Where a generated token goes: logits over the CELLS x CELLS cells and an (x, y) per cell.
    A mixture of 9 instead of one MSE regression: an averaged position is the image centre."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cells = CELLS * CELLS
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 3 * self.cells))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(K, H) -> cell logits (K, 9) and per-cell (x, y) (K, 9, 2)."""
        out = self.net(h)
        return out[:, : self.cells], out[:, self.cells :].reshape(-1, self.cells, 2)

    def loss_sum(self, h: Tensor, xy: Tensor) -> Tensor:
        """Cross-entropy of the true cell plus the weighted squared error of its (x, y), summed."""
        logits, xy_per_cell = self(h)
        cell = cell_of(xy)  # (K,)
        chosen = xy_per_cell.gather(1, cell.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)  # (K, 2)
        sq = F.mse_loss(chosen, xy, reduction="sum") / 2  # per token, like the mean over its 2 coords
        return F.cross_entropy(logits, cell, reduction="sum") + PLACE_OFFSET_WEIGHT * sq

    def place(self, h: Tensor) -> Tensor:
        """(K, H) -> (K, 2): the (x, y) of the most likely cell."""
        logits, xy_per_cell = self(h)
        cell = logits.argmax(-1)  # (K,)
        return xy_per_cell.gather(1, cell.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)  # (K, 9, 2) -> (K, 2)


def cell_of(xy: Tensor) -> Tensor:
    """(K, 2) positions in [0, 1] -> (K,) row-major cell index."""
    c = (xy.clamp(0, 1 - 1e-6) * CELLS).long()  # (K, 2) column, row
    return c[:, 1] * CELLS + c[:, 0]


class TokenHead(nn.Module):
    """The regress_head stage: hidden states at <target> slots -> vision tokens; with a place head,
    its position replaces the regressed dims 0-1 (a token's centroid); with a token bank, the rest
    snaps to the nearest real token's."""

    def __init__(self, model: Setokim):
        super().__init__()
        self.regress, self.place, self.bank = model.regress, model.place, model.bank

    def forward(self, h: Tensor) -> Tensor:
        tokens = self.regress(h)  # (K, D)
        if self.place is not None:
            tokens = torch.cat([self.place.place(h), tokens[:, 2:]], -1)  # (K, 2) + (K, D - 2)
        return tokens if self.bank is None else self.bank(tokens)


class Setokim(nn.Module):
    def __init__(self, cfg: SetokimConfig, tokenizer, pretrained: bool = False):
        """`pretrained`: start from the weights of the configs' Hugging Face directories (training
        does); otherwise every part is built from the configs and loaded from a checkpoint."""
        super().__init__()
        self.cfg = cfg
        self.tok = tokenizer
        self.vision = VisionTokenizer(cfg, pretrained)
        self.llm = build_llm(cfg, tokenizer, pretrained)
        hidden = self.llm.config.hidden_size
        d = cfg.merger.token_dim
        self.projector = Projector(d, hidden)
        self.regress = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.seg_query = nn.Linear(hidden, hidden)
        self.seg_key = nn.Linear(hidden, hidden)
        # Drawn on a forked RNG: every other weight, and whatever the trainer draws next, is then the
        # same with or without the head, so a head run differs from a plain one by the head alone
        # (built inline, its draws had moved stage 1 to another tau: 9.3 tokens per image, not 8.2).
        with torch.random.fork_rng(devices=[]):
            self.place = PlaceHead(hidden) if cfg.place_head else None
        self.bank = TokenBank(cfg.token_bank, d) if cfg.token_bank else None
        self.ids = T.special_ids(tokenizer)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ---- sequences -------------------------------------------------------------------------
    def encode_text(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"]

    def prompt(self, vision: Tensor, template: str, **fields: str) -> Sequence:
        """<bos> before <im_start> V.. <im_end> after: exactly num_tokens vision slots, never padding."""
        before, after = split_prompt(template, **fields)
        image = [self.ids[T.IM_START]] + [-1] * vision.shape[0] + [self.ids[T.IM_END]]
        ids = [self.ids[T.BOS]] + self.encode_text(before) + image + self.encode_text(after)
        return Sequence(vision=vision).add(ids)

    def generation_prefix(self, caption: str) -> Sequence:
        return Sequence().add([self.ids[T.BOS]] + self.encode_text(DRAW_PROMPT.format(c=caption)))

    def collate(self, seqs: list[Sequence], left_pad: bool = False) -> Batch:
        """Pad to one length, embed text ids, drop projected vision tokens into their slots."""
        length = max(len(s.ids) for s in seqs)
        n = len(seqs)
        ids = torch.full((n, length), -1, dtype=torch.long)
        sup = torch.zeros((n, length), dtype=torch.bool)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(length - len(s.ids), length) if left_pad else slice(0, len(s.ids))
            ids[i, sl] = torch.tensor(s.ids)
            sup[i, sl] = torch.tensor(s.supervised)
            mask[i, sl] = 1
        embed = self.llm.get_input_embeddings()
        # Built on the host, moved once (not a copy per sequence).
        ids, sup, mask = ids.to(self.device), sup.to(self.device), mask.to(self.device)
        embeds = embed(ids.clamp_min(0))  # (S, L, H); vision and pad slots overwritten / masked
        slots = (ids == -1) & (mask == 1)
        vision = [s.vision for s in seqs if s.vision is not None]
        if vision:
            embeds = embeds.clone()
            embeds[slots] = self.projector(torch.cat(vision, 0)).to(embeds.dtype)
        if self.cfg.gen_feedback:
            embeds = self._feed_back(embeds, ids, seqs)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (S, L): positions count real tokens only
        return Batch(embeds, mask, pos, ids, sup, [len(s.ids) for s in seqs], seqs)

    def _feed_back(self, embeds: Tensor, ids: Tensor, seqs: list[Sequence]) -> Tensor:
        """Teacher forcing of gen_feedback: <target> slot j > 0 also reads the true token j - 1."""
        rows = [i for i, s in enumerate(seqs) if s.targets is not None and len(s.targets) > 1]
        if not rows:
            return embeds
        at = [(ids[i] == self.ids[T.TARGET]).nonzero()[1:, 0] for i in rows]  # slots 1.. of each row
        r = torch.cat([torch.full_like(a, i) for i, a in zip(rows, at)])
        prev = torch.cat([seqs[i].targets[:-1] for i in rows])  # (sum K - 1, D)
        embeds = embeds.clone()
        embeds[r, torch.cat(at)] += self.projector(prev).to(embeds.dtype)
        return embeds

    def hidden(self, batch: Batch) -> tuple[Tensor, Tensor]:
        out = self.llm(
            inputs_embeds=batch.embeds, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids, output_hidden_states=True, use_cache=False,
        )
        return out.logits, out.hidden_states[-1]  # (S, L, V), (S, L, H)

    # ---- training losses -------------------------------------------------------------------
    def losses(self, seqs: list[Sequence], buckets: int = 4) -> dict[str, Tensor]:
        """Mean LM (per sequence, then over sequences) / regression / segmentation losses."""
        sums, counts = self.loss_sums(seqs, buckets)
        return {name: sums[name] / counts[name] for name in sums}

    def loss_sums(self, seqs: list[Sequence], buckets: int = 4) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Each loss as (sum, count) over `seqs`, so ranks can divide by the global count.

        Sequences are sorted by length and run in `buckets` groups, each padded only to its own
        longest: a caption (~60 ids) and a question (~20) in one padded batch waste most of the
        LLM's compute on padding. The losses are sums over all groups divided by global counts,
        so they equal the one-batch values whatever the grouping.
        """
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
        size = -(-len(order) // max(1, buckets))
        sums: dict[str, list[Tensor]] = {}
        counts: dict[str, int] = {}
        for start in range(0, len(order), size):
            group = [seqs[i] for i in order[start : start + size]]
            batch = self.collate(group)
            logits, hidden = self.hidden(batch)
            for name, (total, n) in self._loss_sums(batch, logits, hidden).items():
                sums.setdefault(name, []).append(total)
                counts[name] = counts.get(name, 0) + n
        names = [name for name in LOSS_NAMES if counts.get(name)]
        return {name: torch.stack(sums[name]).sum() for name in names}, {name: counts[name] for name in names}

    def _loss_sums(self, batch: Batch, logits: Tensor, hidden: Tensor) -> dict[str, tuple[Tensor, int]]:
        """(sum, count) per loss in one padded group."""
        out = {}
        sup = batch.supervised[:, 1:]  # (S, L-1): predict t from the prefix up to t-1
        if sup.any():
            # Each sequence weighs the same, not each token: per token, a 40-word caption outweighs
            # a one-word answer 20:1 and VQA, the slowest task to learn, got ~8 % of the gradient.
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.ids[:, 1:].clamp_min(0), reduction="none")  # (S, L-1)
            per_seq = (ce * sup).sum(1) / sup.sum(1).clamp_min(1)  # (S,)
            rows = sup.any(1)
            out["lm"] = (per_seq[rows].sum(), int(rows.sum()))
        rows = [i for i, s in enumerate(batch.seqs) if s.targets is not None]
        if rows:
            at_slots = hidden[rows][batch.ids[rows] == self.ids[T.TARGET]]  # (sum K, H)
            target = torch.cat([batch.seqs[i].targets for i in rows], 0)
            out["regress"] = (F.mse_loss(self.regress(at_slots), target, reduction="sum"), target.numel())
            if self.place is not None:
                out["place"] = (self.place.loss_sum(at_slots, target[:, :2]), len(target))
        rows = [i for i, s in enumerate(batch.seqs) if s.seg_labels is not None]
        if rows:
            seg = torch.cat([self.seg_logits(batch, hidden, i) for i in rows])
            labels = torch.cat([batch.seqs[i].seg_labels for i in rows]).float()
            out["seg"] = (F.binary_cross_entropy_with_logits(seg, labels, reduction="sum"), labels.numel())
        return out

    def seg_logits(self, batch: Batch, hidden: Tensor, row: int) -> Tensor:
        """Score each vision token of sequence `row` for the expression that ends it."""
        n = batch.lengths[row]
        q = self.seg_query(hidden[row, n - 1])  # (H,) last real position (right padding)
        k = self.seg_key(hidden[row, : n][batch.ids[row, :n] == -1])  # (K, H)
        return k @ q / q.shape[-1] ** 0.5  # (K,)

    # ---- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, seqs: list[Sequence], max_new_tokens: int, keep_hidden: bool = False, feedback: bool = False):
        """Batched greedy decode with the KV cache. Returns new ids per sequence (and the
        last-layer hidden state of each fed-back token when keep_hidden). `feedback`: each fed
        <target> after a row's first carries that row's last generated token (cfg.gen_feedback)."""
        batch = self.collate(seqs, left_pad=True)
        out = self.llm(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=True, output_hidden_states=keep_hidden)
        past, mask, pos = out.past_key_values, batch.attention_mask, batch.position_ids[:, -1:]
        done = torch.zeros(len(seqs), dtype=torch.bool, device=batch.embeds.device)
        new_ids, hiddens = [[] for _ in seqs], [[] for _ in seqs]
        logits = out.logits[:, -1]
        prev = torch.zeros(len(seqs), self.cfg.merger.token_dim, device=batch.embeds.device) if feedback else None
        has_prev = torch.zeros_like(done)
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1)  # (S,)
            for i in range(len(seqs)):
                if not done[i]:
                    new_ids[i].append(int(nxt[i]))
            done |= nxt == self.ids[T.EOS]
            if done.all():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            emb = self.llm.get_input_embeddings()(nxt).unsqueeze(1)  # (S, 1, H)
            is_target = nxt == self.ids[T.TARGET]
            if feedback and (is_target & has_prev).any():
                fed = is_target & has_prev
                emb = emb.clone()
                emb[fed, 0] += self.projector(prev[fed]).to(emb.dtype)
            out = self.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                           past_key_values=past, use_cache=True, output_hidden_states=keep_hidden or feedback)
            past, logits = out.past_key_values, out.logits[:, -1]
            if feedback and is_target.any():
                prev[is_target] = TokenHead(self)(out.hidden_states[-1][is_target, -1].float())
                has_prev |= is_target
            if keep_hidden:
                for i in range(len(seqs)):
                    if len(hiddens[i]) < len(new_ids[i]):
                        hiddens[i].append(out.hidden_states[-1][i, -1])
        return (new_ids, hiddens) if keep_hidden else new_ids

    def decode(self, ids: list[int]) -> str:
        eos = self.ids[T.EOS]
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def caption(self, tokens: Tensor, num_tokens: Tensor, max_new_tokens: int = 64) -> list[str]:
        seqs = [self.prompt(tokens[i, : num_tokens[i]], CAPTION_PROMPT) for i in range(tokens.shape[0])]
        return [self.decode(ids) for ids in self.greedy(seqs, max_new_tokens)]

    @torch.no_grad()
    def answer(self, tokens: Tensor, num_tokens: Tensor, questions: list[str], max_new_tokens: int = 8) -> list[str]:
        seqs = [self.prompt(tokens[i, : num_tokens[i]], QUESTION_PROMPT, q=q) for i, q in enumerate(questions)]
        return [self.decode(ids) for ids in self.greedy(seqs, max_new_tokens)]

    @torch.no_grad()
    def segment_tokens(self, tokens: Tensor, num_tokens: Tensor, expressions: list[str]) -> list[Tensor]:
        """Per image, a bool (K,) selection of the vision tokens the expression refers to."""
        seqs = [self.prompt(tokens[i, : num_tokens[i]], REFER_PROMPT, e=e) for i, e in enumerate(expressions)]
        batch = self.collate(seqs)
        _, hidden = self.hidden(batch)
        return [self.seg_logits(batch, hidden, i) > 0 for i in range(len(seqs))]

    @torch.no_grad()
    def generate_tokens(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Text -> vision tokens (B, T, D) and their count: the LLM chooses how many."""
        seqs = [self.generation_prefix(c) for c in captions]
        t_max = self.cfg.max_tokens
        new_ids, hiddens = self.greedy(seqs, t_max + 3, keep_hidden=True, feedback=self.cfg.gen_feedback)
        d = self.cfg.merger.token_dim
        tokens = torch.zeros(len(seqs), t_max, d, device=self.device)
        counts = torch.zeros(len(seqs), dtype=torch.long)
        for i, (ids, hs) in enumerate(zip(new_ids, hiddens)):
            # hs[j] is the hidden state of fed-back token ids[j]; regress only at <target>.
            slots = [h for tok, h in zip(ids, hs) if tok == self.ids[T.TARGET]][:t_max]
            if slots:
                tokens[i, : len(slots)] = TokenHead(self)(torch.stack(slots))
            counts[i] = max(len(slots), 1)
        return tokens, counts

    # ---- checkpoints -------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, extra: dict | None = None,
                        optimizer: dict[str, Tensor] | None = None) -> None:
        """Write config, weights and tokenizer atomically; `extra`/`optimizer` carry the
        training state that `setok train --resume` continues from."""
        from safetensors.torch import save_file, save_model

        with atomic_dir(path) as tmp:
            (tmp / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
            save_model(self, str(tmp / "model.safetensors"))
            self.tok.save_pretrained(str(tmp))
            if extra is not None:
                (tmp / "training_state.json").write_text(json.dumps(extra, indent=2))
            if optimizer is not None:
                save_file(optimizer, str(tmp / "optimizer.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Setokim:
        from safetensors import SafetensorError

        path = Path(path)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (path / name).is_file():
                raise CheckpointError(f"{path}: missing {name}; expected a checkpoint directory written by `setok train`")
        try:
            cfg = SetokimConfig.from_dict(json.loads((path / "config.json").read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}/config.json is not valid JSON ({e})") from None
        from transformers.modeling_utils import no_init_weights

        with no_init_weights():  # every weight is read below (strictly): random init would be wasted time
            model = cls(cfg, T.load_text_tokenizer(path))
        model.llm.tie_weights()  # skipped with the init; tied embeddings are stored once
        try:
            load_weights(model, path / "model.safetensors")
        except (SafetensorError, RuntimeError, OSError) as e:
            raise CheckpointError(f"{path}/model.safetensors is corrupt or does not match config.json: {str(e).splitlines()[0]}") from None
        return model.eval()


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


@torch.no_grad()
def load_weights(model: nn.Module, file: Path) -> None:
    """Read a safetensors file straight into `model`'s tensors: peak memory is the model itself.

    safetensors' load_model holds a second full copy (2x for a 1B LLM), and its memory map counts
    every page it touches in the process's RSS; here each tensor's bytes are read (plain file
    reads, no map) into the parameter's own storage. Strict: every tensor of the file exists in
    the model with its shape and dtype; a model tensor absent from the file must share storage
    with one present (tied embeddings are saved once).
    """
    own = model.state_dict()  # detached views of the parameters and persistent buffers
    total = Path(file).stat().st_size
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= total - 8:
            raise RuntimeError(f"not a safetensors file (header of {size} bytes in a {total}-byte file)")
        try:
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
        except (ValueError, AttributeError):
            raise RuntimeError("not a safetensors file (its header is not a JSON object)") from None
        unexpected = [n for n in header if n not in own]
        if unexpected:
            raise RuntimeError(f"unexpected tensors {unexpected[:3]} (and {max(0, len(unexpected) - 3)} more)")
        loaded: set[int] = set()
        for name, info in header.items():
            target, (begin, end) = own[name], info["data_offsets"]
            if not 0 <= begin <= end <= total - 8 - size:
                raise RuntimeError(f"{name}: data offsets {begin}..{end} outside the file")
            if list(target.shape) != info["shape"] or SAFETENSORS_DTYPES.get(info["dtype"]) != target.dtype:
                raise RuntimeError(f"{name}: {info['dtype']} {info['shape']} in the file, {target.dtype} "
                                   f"{list(target.shape)} in the model")
            f.seek(8 + size + begin)
            buf = target if target.is_contiguous() else torch.empty_like(target, memory_format=torch.contiguous_format)
            if buf.numel() and f.readinto(buf.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise RuntimeError(f"{name}: the file ends inside the tensor")
            if buf is not target:
                target.copy_(buf)
            loaded.add(target.untyped_storage().data_ptr())
    missing = [n for n, t in own.items() if t.numel() and t.untyped_storage().data_ptr() not in loaded]
    if missing:
        raise RuntimeError(f"missing tensors {missing[:3]} (and {max(0, len(missing) - 3)} more)")
