"""Calibration inputs: real tensors flowing through the bundle's own earlier stages.

Every stage is calibrated on what it sees at inference: the encoder on preprocessed images, the
merger on the encoder's and the cluster stage's real outputs, the projector on the merger's tokens,
the LLM on real prompt embeddings (image prefix + caption / question / referring / draw prompts,
prefill with an empty past), the heads on real LLM hidden states, the detokenizer on real tokens.
Upstream stages run in fp32 (the bundle as exported), as post-training calibration expects.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from setok import manifest as M
from setok.backends.decode import prefill_feeds
from setok.errors import InputError

log = logging.getLogger(__name__)

MIN_IMAGES = 8


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str | None = None
    question: str | None = None
    expression: str | None = None
    answer: str | None = None


class FeedReader(CalibrationDataReader):
    """A list of feed dicts as an onnxruntime CalibrationDataReader (rewindable, rangeable)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._start, self._end, self._i = 0, len(feeds), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start + self._i >= self._end:
            return None
        self._i += 1
        return self.feeds[self._start + self._i - 1]

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end, self._i = start_index, min(end_index, len(self.feeds)), 0

    def rewind(self) -> None:
        self.set_range(0, len(self.feeds))


def load_samples(data: str, n: int, size: int, seed: int) -> list[Sample]:
    """`synthetic` (training-seed scenes: never the eval seeds) or a folder of images."""
    if not isinstance(n, int) or n < MIN_IMAGES:
        raise InputError(f"calibration needs at least {MIN_IMAGES} images; got n={n!r}")
    if data == "synthetic":
        from setok.data.items import SceneStream

        return _from_items(SceneStream(size, seed).batch(0, n))
    return _folder_samples(Path(data), n, size)


def heldout_samples(size: int, seed: int, n: int = MIN_IMAGES) -> list[Sample]:
    """Held-out scenes (the eval seeds, disjoint from every training / calibration seed)."""
    from setok.data.items import eval_items

    return _from_items(eval_items(n, seed, size))


def _from_items(items) -> list[Sample]:
    return [Sample(it.image, it.caption, it.qa[0][0] if it.qa else None,
                   it.referring[0][0] if it.referring else None, it.qa[0][1] if it.qa else None) for it in items]


def _folder_samples(folder: Path, n: int, size: int) -> list[Sample]:
    from PIL import Image

    from setok.runtime.preprocess import to_rgb_array

    if not folder.is_dir():
        raise InputError(f"calibration data {str(folder)!r}: expected 'synthetic' or a folder of images")
    exts = {e.lower() for e in Image.registered_extensions()}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if len(files) < MIN_IMAGES:
        raise InputError(f"{folder}: has {len(files)} image files; calibration needs at least {MIN_IMAGES}")
    # A user's image that does not decode is an error naming it (to_rgb_array does), not a skip:
    # silently calibrating on fewer images than asked hides a broken data set.
    return [Sample(to_rgb_array(p, size)) for p in files[:n]]


def collect_feeds(pipe, samples: list[Sample], stages: list[str]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the fp32 bundle on every sample; keep each wanted stage's real inputs. A feed is
    computed only when its stage is wanted (the LLM runs only for stages that read it)."""
    feeds: dict[str, list[dict]] = {s: [] for s in stages}
    pre = pipe.manifest.preprocessing
    from setok.runtime.preprocess import normalize

    for s in samples:
        px = normalize(s.image[None], pre["mean"], pre["std"])
        _vision_feeds(pipe, px, s, feeds)
    return {k: v for k, v in feeds.items() if v}


def _vision_feeds(pipe, px: np.ndarray, s: Sample, feeds: dict) -> None:
    from setok.runtime.masks import CropOwners
    from setok.runtime.pipeline import Tokens
    from setok.runtime.preprocess import to_unit_rgb

    _add(feeds, "encoder", lambda: {M.PIXEL_VALUES: px})
    pf = pipe.stage("encoder").run({M.PIXEL_VALUES: px})[M.PATCH_FEATURES]
    c = pipe.stage("cluster").run({M.PATCH_FEATURES: pf})
    merger_in = {M.PATCH_FEATURES: pf, M.ASSIGNMENT: c[M.ASSIGNMENT], M.NUM_TOKENS: c[M.NUM_TOKENS]}
    _add(feeds, "merger", lambda: merger_in)
    padded = pipe.stage("merger").run(merger_in)[M.VISION_TOKENS]  # (1, T, D), zero past num_tokens
    k = int(c[M.NUM_TOKENS][0])
    _add(feeds, "detokenizer", lambda: {M.VISION_TOKENS: padded, M.NUM_TOKENS: c[M.NUM_TOKENS]})
    tokens = np.ascontiguousarray(padded[0, :k])
    _add(feeds, "projector", lambda: {M.VISION_TOKENS: tokens})
    unit = functools.partial(to_unit_rgb, px[0], pipe.manifest.preprocessing)
    vt = Tokens(tokens, c[M.ASSIGNMENT][0], c[M.CENTERS][0, :k], CropOwners(c[M.ASSIGNMENT][0], unit, pipe.grid, pipe.patch, k))
    _add(feeds, "llm", lambda: _language_feeds(pipe, vt, s, feeds))
    expr = s.expression or s.caption
    if expr:
        _add(feeds, "seg_head", lambda: _refer_feed(pipe, vt, expr, feeds))
    if s.caption:
        _add(feeds, "regress_head", lambda: _regress_feed(pipe, s.caption, vt.num_tokens, feeds))


def _language_feeds(pipe, vt, s: Sample, feeds: dict) -> None:
    """The caption and question prompts through the LLM (its feeds are recorded by _llm_run)."""
    prompts = pipe.prompts
    # Teacher forcing: the caption / answer text after the prompt is what the LLM reads in training.
    seqs = [(prompts["caption"], {}, s.caption)]
    if s.question:
        seqs.append((prompts["question"], {"q": s.question}, s.answer))
    for template, fields, follow in seqs:
        embeds, _ = pipe.prompt(vt, template, **fields)
        if follow:
            embeds = np.concatenate([embeds, _embed(pipe, pipe.encode(" " + follow))], axis=1)
        _llm_run(pipe, embeds, feeds)


def _refer_feed(pipe, vt, expr: str, feeds: dict) -> dict[str, np.ndarray]:
    embeds, first = pipe.prompt(vt, pipe.prompts["refer"], e=expr)
    hidden = _llm_run(pipe, embeds, feeds)
    return {M.QUERY_HIDDEN: np.ascontiguousarray(hidden[:, -1]),
            M.TOKEN_HIDDEN: np.ascontiguousarray(hidden[:, first:first + vt.num_tokens])}


def _regress_feed(pipe, caption: str, k: int, feeds: dict) -> dict[str, np.ndarray]:
    """The draw format the LLM is trained on: <bos> draw.. <im_start> <target>*K; hidden at the slots."""
    ids = [pipe.ids["<bos>"]] + pipe.encode(pipe.prompts["draw"].format(c=caption))
    ids += [pipe.ids["<im_start>"]] + [pipe.ids["<target>"]] * k
    hidden = _llm_run(pipe, _embed(pipe, ids), feeds)
    return {M.HIDDEN: np.ascontiguousarray(hidden[0, -k:])}


def _embed(pipe, ids: list[int]) -> np.ndarray:
    return pipe.embeddings[ids][None].astype(np.float32)


def _llm_run(pipe, embeds: np.ndarray, feeds: dict) -> np.ndarray:
    """Prefill with an empty past, as Pipeline._llm does; records the llm feed (when wanted),
    returns the hidden states."""
    feed = prefill_feeds(pipe.manifest.stage("llm"), embeds)
    feeds.get("llm", []).append(feed)
    return pipe.stage("llm").run(feed)[M.HIDDEN_STATES]


def _add(feeds: dict, stage: str, make) -> None:
    """Record `make()` as one feed of `stage` when that stage is wanted (nothing is computed otherwise).
    A `make` that records its feeds itself (the llm's) returns None."""
    if stage in feeds:
        feed = make()
        if feed is not None:
            feeds[stage].append(feed)


def stack_feeds(feeds: list[dict]) -> dict[str, np.ndarray]:
    """ModelOpt takes one array per input, batched on axis 0: use the largest group of equal shapes."""
    groups = Counter(tuple((k, v.shape[1:]) for k, v in sorted(f.items())) for f in feeds)
    key = groups.most_common(1)[0][0]
    same = [f for f in feeds if tuple((k, v.shape[1:]) for k, v in sorted(f.items())) == key]
    if len(same) < len(feeds):
        log.warning("modelopt calibration: %d of %d feeds share one shape and are used", len(same), len(feeds))
    return {k: np.concatenate([f[k] for f in same]) for k in same[0]}
