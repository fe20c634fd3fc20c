"""The runtime: chains the bundle's stages with no torch import. It reads only the manifest and
the files it names. Every result carries per-stage timings (seconds) and, for results about an
input frame, where the encoder's view lies in that frame (`frame`: `frame_size`, `crop_box`,
`scale`); masks, boxes and centroids are in the frame's pixels (the encoder-input versions stay
available as `masks_crop` / `mask_crop`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from setok import manifest as M
from setok.backends.base import Backend
from setok.backends.decode import Decoder, prefill_feeds
from setok.backends.onnxrt.session import OrtBackend
from setok.errors import BundleError, InputError
from setok.runtime.aio import AsyncMethods
from setok.runtime.frame import (
    MODES,
    FrameSource,
)
from setok.runtime.guided import (
    ConstraintCache,
    Guide,
    Structure,
    TokenIndex,
    structure,
)
from setok.runtime.masks import CropOwners
from setok.runtime.prefix_cache import PrefixCache
from setok.runtime.preprocess import Prepared, normalize, prepare, to_uint8, to_unit_rgb
from setok.runtime.results import Image, ImageInput, Mask, Text, Tokens
from setok.runtime.sampling import SamplingParams, cut_at_stop, held_back, pick, resolve
from setok.runtime.timing import timed

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)


class Pipeline(AsyncMethods):
    def __init__(self, bundle: Path, manifest: M.Manifest, backend: str, providers: list | None, threads: int | None,
                 engines: Path | None = None, spin: bool = True, max_context: int | None = None,
                 letterbox: bool | None = None, prefix_cache: int = 16):
        self.bundle, self.manifest, self.backend, self.engines = bundle, manifest, backend, engines
        self.spin = spin
        self.providers, self.threads = providers, threads
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._closed = False
        cfg = manifest.config
        pre = manifest.preprocessing
        self.size = pre["size"]
        self.patch = cfg["encoder"]["patch_size"]
        self.grid = self.size // self.patch
        # How a frame becomes the encoder's square: the manifest's rule (bundles before the field: crop),
        # or letterbox on request (nothing of the frame is cut off; objects come out smaller).
        mode = pre.get("mode", "crop") if letterbox is None else ("letterbox" if letterbox else "crop")
        if mode not in MODES:
            raise BundleError(f"manifest preprocessing.mode {mode!r}; expected one of {list(MODES)}")
        self.mode = mode
        self.fill = tuple(round(float(m) * 255) for m in pre["mean"])  # letterbox padding: the mean colour
        self.max_tokens = manifest.stage("detokenizer").inputs[0].shape[1]
        self.ids = manifest.text["special_ids"]
        # The LLM's context: what the bundle was exported for, capped by the caller (a robot may
        # give a 32k-context LLM a few hundred positions to bound its KV cache).
        self.max_context = min(int(manifest.text["max_positions"]), max_context or 1 << 62)
        self.prompts = manifest.text["prompts"]
        self.embeddings = np.load(M.inside(bundle, manifest.files["embeddings"]["file"])).astype(np.float32)
        self.tokenizer = _load_tokenizer(M.inside(bundle, manifest.files["tokenizer"]["file"]))
        # The KV of prompt prefixes (the text before the image), shared by calls asking the same thing.
        self.prefix_cache = PrefixCache(prefix_cache)
        self._constraints = ConstraintCache(
            lambda: TokenIndex(self.tokenizer, int(self.embeddings.shape[0]), int(self.ids["<eos>"])))

    @classmethod
    def open(cls, bundle: str | Path, backend: str = "onnxruntime", providers: list | None = None,
             threads: int | None = None, spin: bool = True, max_context: int | None = None, *,
             letterbox: bool | None = None, prefix_cache: int = 16) -> Pipeline:
        """Open a bundle (backend "onnxruntime") or an engines directory written by `setok build`
        (backend "tensorrt"): the manifest is read and every file's sha256 checked; sessions are lazy.
        `letterbox=True` pads frames to the square instead of cropping them; `prefix_cache` is how
        many prompt prefixes keep their KV (0: none)."""
        bundle = Path(bundle)
        if not isinstance(prefix_cache, int) or prefix_cache < 0:
            raise InputError(f"prefix_cache: got {prefix_cache!r}; expected an integer >= 0 (0: no cache)")
        extra = {"max_context": max_context, "letterbox": letterbox, "prefix_cache": prefix_cache}
        if backend == "onnxruntime":
            return cls(bundle, M.load_manifest(bundle), backend, providers, threads, spin=spin, **extra)
        if backend == "tensorrt":
            if not (bundle / "engines.json").is_file():
                raise InputError(f"{bundle}: no engines.json; backend 'tensorrt' opens a directory written by `setok build`")
            contract = bundle / "bundle"
            return cls(contract, M.load_manifest(contract, stages=False), backend, providers, threads, engines=bundle,
                       **extra)
        raise InputError(f"backend {backend!r}; expected 'onnxruntime' or 'tensorrt'")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stage(self, name: str) -> Backend:
        with self._lock:  # sessions are created once, lazily; ORT sessions are thread-safe to run
            if self._closed:
                raise RuntimeError(f"stage {name!r}: this Pipeline is closed; open the bundle again")
            if self.engines is not None:
                return self._engine(name)
            if name not in self._backends:
                entry = self.manifest.stage(name)
                self._backends[name] = OrtBackend(M.inside(self.bundle, entry.file), entry, self.providers, self.threads,
                                                  self.spin)
            return self._backends[name]

    def _engine(self, name: str) -> Backend:
        """TensorRT engines (all opened at once: one CUDA context, shared stream)."""
        if not self._backends:
            from setok.backends.trt.runner import open_engines

            self._backends.update(open_engines(self.engines))
        # One engine serves a stage and its alternative forms: it was built from one of them.
        return self._backends[self.manifest.stage(name).serves]

    def warmup(self) -> dict[str, float]:
        """Open every stage the default path runs and run each once (encoder, cluster, merger,
        projector, llm prefill and decode, seg_head, regress_head, detokenizer): the first real
        call pays no session creation or first-run allocation. Returns the stages' timings."""
        vt = self.tokenize(np.zeros((self.size, self.size, 3), np.uint8))
        t = dict(vt.timings)
        t.update(self.caption(vt, max_new_tokens=2).timings)
        t.update(self.segment(vt, "object").timings)
        with timed(t, "detokenizer"):
            self.reconstruct(vt)
        for entry in self.manifest.stages:  # what the calls above did not open (the generation head)
            if entry.form_of is None and entry.name not in self._backends:
                feeds = {x.name: np.zeros([d if isinstance(d, int) else 1 for d in x.shape], x.dtype) for x in entry.inputs}
                with timed(t, entry.name):
                    self.stage(entry.name).run(feeds)
        return t

    def close(self) -> None:
        """Release every session (and the prefix cache); the pipeline cannot run after this."""
        with self._lock:
            self._closed = True
            for b in self._backends.values():
                b.close()
            self._backends.clear()
        self.prefix_cache.clear()

    # ---- vision -----------------------------------------------------------------------------
    def _prepare(self, image: Any) -> Prepared:
        return prepare(image, self.size, self.mode, self.fill)

    def tokenize(self, image: ImageInput, cluster_stage: str = "cluster") -> Tokens:
        """Image -> exactly num_tokens vision tokens and the pixel mask each one owns."""
        if isinstance(image, Tokens):
            return image
        t: dict[str, float] = {}
        with timed(t, "preprocess"):
            prep = self._prepare(image)
            px = normalize(prep.rgb[None], self.manifest.preprocessing["mean"], self.manifest.preprocessing["std"])
        return self._tokenize_all(px, t, cluster_stage, [prep])[0]

    def tokenize_batch(self, images: Sequence[ImageInput]) -> list[Tokens]:
        """Several images through the vision stages in one batched run each (one Tokens per image;
        each carries the batch's stage timings)."""
        if not images:
            raise InputError("tokenize_batch: got no images; expected at least one")
        t: dict[str, float] = {}
        with timed(t, "preprocess"):
            preps = [self._prepare(im) for im in images]
            px = normalize(np.stack([p.rgb for p in preps]), self.manifest.preprocessing["mean"],
                           self.manifest.preprocessing["std"])
        return self._tokenize_all(px, t, preps=preps)

    def _tokenize_pixels(self, px: np.ndarray, t: dict[str, float], cluster_stage: str = "cluster") -> Tokens:
        return self._tokenize_all(px, t, cluster_stage)[0]

    def _tokenize_all(self, px: np.ndarray, t: dict[str, float], cluster_stage: str = "cluster",
                      preps: list[Prepared] | None = None) -> list[Tokens]:
        with timed(t, "encoder"):
            feats = self.stage("encoder").run({M.PIXEL_VALUES: px})[M.PATCH_FEATURES]
        with timed(t, "cluster"):
            c = self.stage(cluster_stage).run({M.PATCH_FEATURES: feats})
        with timed(t, "merger"):
            tokens = self.stage("merger").run({M.PATCH_FEATURES: feats, M.ASSIGNMENT: c[M.ASSIGNMENT],
                                               M.NUM_TOKENS: c[M.NUM_TOKENS]})[M.VISION_TOKENS]
        out = []
        for i, k in enumerate(int(x) for x in c[M.NUM_TOKENS]):
            if k < 1:  # the plugin's AOT kernel marks rows longer than it was compiled for
                raise BundleError(f"{cluster_stage}: num_tokens={k} for {feats.shape[1]} patches: the cluster engine's "
                                    "kernel was built for fewer patches; rebuild the engines with `setok build`")
            assignment = c[M.ASSIGNMENT][i]
            # each token's cluster at pixel resolution (borders follow colour edges), on first use
            unit = functools.partial(to_unit_rgb, px[i], self.manifest.preprocessing)
            crop = CropOwners(assignment, unit, self.grid, self.patch, k)
            source = FrameSource(preps[i].frame, crop, preps[i].pixels) if preps is not None else None
            out.append(Tokens(tokens[i, :k], assignment, c[M.CENTERS][i, :k], crop, dict(t), source))
        return out

    # ---- language ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The bundle tokenizer's ids of `text` (no special tokens)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt(self, vt: Tokens, template: str, **fields: str) -> tuple[np.ndarray, int]:
        """Embeddings (1, L, H) of <bos> before <im_start> V.. <im_end> after (the manifest's prompt
        template, e.g. `pipe.prompts["question"]`, filled in with `fields`): exactly num_tokens vision
        slots. Returns them and the first vision slot; what `decoder().step` takes as its prefill."""
        _, embeds, first = self.prompt_parts(vt, template, **fields)
        return embeds, first

    def prompt_parts(self, vt: Tokens, template: str, **fields: str) -> tuple[list[int], np.ndarray, int]:
        """`prompt`, plus the token ids before the vision slots (the prefix cache's key)."""
        t = vt.timings
        with timed(t, "projector"):
            vision = self.stage("projector").run({M.VISION_TOKENS: vt.tokens.astype(np.float32)})[M.EMBEDS]
        before, after = M.split_prompt(template, **fields)
        head_ids = [self.ids["<bos>"]] + self.encode(before) + [self.ids["<im_start>"]]
        head = self.embeddings[head_ids]
        tail = self.embeddings[[self.ids["<im_end>"]] + self.encode(after)]
        return head_ids, np.concatenate([head, vision, tail])[None], len(head)  # (1, L, H), first vision slot

    def caption(self, image: ImageInput, max_new_tokens: int | None = None, deadline: float | None = None, *,
                sampling: SamplingParams | None = None, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None, seed: int | None = None, stop: Sequence[str] | str | None = None) -> Text:
        """Describe the image. `deadline` (seconds from now) returns what was decoded by then."""
        s = resolve(sampling, 64, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop=stop)
        due = _due(deadline)
        vt = self._as_tokens(image)
        head, embeds, _ = self.prompt_parts(vt, self.prompts["caption"])
        return self._complete(embeds, vt, s, due, head=head)

    def answer(self, image: ImageInput, question: str, max_new_tokens: int | None = None,
               deadline: float | None = None, *, sampling: SamplingParams | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None, stop: Sequence[str] | str | None = None,
               choices: Sequence[str] | None = None, regex: str | None = None, schema: dict | None = None) -> Text:
        """Answer a question about the image (or about a `Tokens` result: encode once, ask many).

        At most one of `choices` (the answer is one of these strings), `regex` (the whole answer
        matches it) or `schema` (a JSON-schema subset: the answer parses as JSON and fits it)
        constrains the decode token by token; `Text.value` is then the choice, the text or the
        parsed JSON (None, with complete=False, if max_new_tokens ran out first)."""
        s = resolve(sampling, 8, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop=stop)
        guided = structure(choices, regex, schema)
        due = _due(deadline)
        question = _check_text(question, "question")
        guide = self._constraints.get(guided).guide() if guided is not None else None
        vt = self._as_tokens(image)
        head, embeds, _ = self.prompt_parts(vt, self.prompts["question"], q=question)
        return self._complete(embeds, vt, s, due, head=head, guide=guide, guided=guided)

    def answer_batch(self, images: Sequence[ImageInput], questions: Sequence[str], max_new_tokens: int | None = None,
                     *, sampling: SamplingParams | None = None, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     stop: Sequence[str] | str | None = None) -> list[Text]:
        """Answers for several (image or Tokens, question) pairs in one batched LLM run: prompts
        right-padded, one prefill, one decode step per token for the whole batch. Each row samples
        with its own generator seeded by `seed`, so row i is what `answer` gives it alone. The
        Tokens passed in are not modified."""
        s = resolve(sampling, 8, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop=stop)
        if len(images) != len(questions) or not images:
            raise InputError(f"answer_batch: {len(images)} images and {len(questions)} questions; expected equal, >= 1")
        questions = [_check_text(q, "question") for q in questions]
        raw = [i for i, x in enumerate(images) if not isinstance(x, Tokens)]
        vts = [self._as_tokens(x) if isinstance(x, Tokens) else None for x in images]  # own timings per call
        for i, vt in zip(raw, self.tokenize_batch([images[i] for i in raw]) if raw else []):
            vts[i] = vt
        prompts = [self.prompt(vt, self.prompts["question"], q=q)[0][0] for vt, q in zip(vts, questions)]
        t: dict[str, float] = {}
        ids = self._batch_decode(prompts, s, t)
        texts = [self._finish(x, s)[0] for x in ids]
        return [Text(text, x, {**vt.timings, **t}, frame=vt.frame) for text, x, vt in zip(texts, ids, vts)]

    def _greedy_batch(self, prompts: list[np.ndarray], max_new_tokens: int, t: dict[str, float]) -> list[list[int]]:
        return self._batch_decode(prompts, SamplingParams(max_new_tokens=max_new_tokens), t)

    def _batch_decode(self, prompts: list[np.ndarray], s: SamplingParams, t: dict[str, float]) -> list[list[int]]:
        n = s.max_new_tokens or 8
        length = max(p.shape[0] for p in prompts)
        embeds = np.zeros((len(prompts), length, prompts[0].shape[1]), np.float32)
        mask = np.zeros((len(prompts), length), np.int64)
        for i, p in enumerate(prompts):  # right padding: what every llm form takes (backends/decode.py)
            embeds[i, :p.shape[0]], mask[i, :p.shape[0]] = p, 1
        if length + n > self.max_context:
            raise InputError(f"prompt of {length} tokens + {n} new exceeds the context of {self.max_context}")
        rngs = [np.random.default_rng(s.seed) for _ in prompts]
        ids: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        decoder = self.stage("llm").decoder(len(prompts))
        try:
            with timed(t, "llm_prefill"):
                logits, _ = decoder.step(embeds, mask)
            for _ in range(n):
                nxt = logits.argmax(-1)
                for i in np.flatnonzero(~done):
                    tok = int(nxt[i]) if s.greedy else pick(logits[i], s, rngs[i])
                    nxt[i] = tok
                    done[i] = tok == self.ids["<eos>"]
                    if not done[i]:
                        ids[i].append(tok)
                        if s.stop and self._finish(ids[i], s)[1]:
                            done[i] = True
                if done.all():
                    break
                with timed(t, "llm_decode"):
                    logits, _ = decoder.step(self.embeddings[nxt][:, None])
        finally:  # also on an error: the decoder's cache is released
            decoder.close()
        return ids

    def stream(self, image: ImageInput, question: str | None = None, max_new_tokens: int | None = None, *,
               sampling: SamplingParams | None = None, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: Sequence[str] | str | None = None) -> Iterator[str]:
        """Yield text pieces as they are decoded (a caption, or the answer to `question`); their
        concatenation is the caption's / answer's text before stripping, cut at a stop string."""
        s = resolve(sampling, 64, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop=stop)
        vt = self._as_tokens(image)
        if question is None:
            head, embeds, _ = self.prompt_parts(vt, self.prompts["caption"])
        else:
            head, embeds, _ = self.prompt_parts(vt, self.prompts["question"], q=_check_text(question, "question"))
        ids: list[int] = []
        sent = 0
        for tok, _ in self.decode(embeds, vt.timings, s, head=head):
            ids.append(tok)
            full, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), s.stop)
            ready = len(full) if stopped else len(full) - held_back(full, s.stop)
            if ready > sent:
                yield full[sent:ready]
                sent = ready
            if stopped:
                return
        full = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), s.stop)[0]
        if len(full) > sent:
            yield full[sent:]

    def segment(self, image: ImageInput, expression: str) -> Mask:
        """The pixels the expression refers to: `mask` in frame pixels, `mask_crop` in the encoder's."""
        expression = _check_text(expression, "expression")
        vt = self._as_tokens(image)
        embeds, first = self.prompt(vt, self.prompts["refer"], e=expression)
        t = vt.timings
        with timed(t, "llm_prefill"):
            out = self._llm(embeds)
        hidden = out[M.HIDDEN_STATES]  # (1, L, H)
        with timed(t, "seg_head"):
            logits = self.stage("seg_head").run({M.QUERY_HIDDEN: hidden[:, -1],
                                                 M.TOKEN_HIDDEN: hidden[:, first:first + vt.num_tokens]})[M.SEG_LOGITS]
        selected = logits[0] > 0
        crop = vt.masks_crop[selected].any(0) if selected.any() else np.zeros(vt.masks_crop.shape[1:], bool)
        if vt.source is None or vt.frame.is_identity:
            mask = crop
        else:
            mask = np.isin(vt.owners, np.flatnonzero(selected))
        return Mask(mask, selected, t, crop, vt.frame)

    def generate_image(self, prompt: str) -> Image:
        """Text -> vision tokens at the LLM's <target> slots -> detokenizer; the LLM picks the count
        (setok/runtime/generation.py)."""
        from setok.runtime.generation import generate_image

        return generate_image(self, _check_text(prompt, "prompt"))

    def reconstruct(self, vt: Tokens) -> np.ndarray:
        tokens = np.zeros((1, self.max_tokens, vt.tokens.shape[1]), np.float32)
        tokens[0, : vt.num_tokens] = vt.tokens
        img = self.stage("detokenizer").run({M.VISION_TOKENS: tokens, M.NUM_TOKENS: np.array([vt.num_tokens], np.int64)})[M.IMAGE]
        return to_uint8(img[0], self.manifest.preprocessing)

    @property
    def vision_token_dim(self) -> int:
        """D, the width of one vision token (what the merger emits and the detokenizer reads)."""
        return int(self.manifest.stage("detokenizer").inputs[0].shape[2])

    # ---- decoding ---------------------------------------------------------------------------
    def _as_tokens(self, image: ImageInput) -> Tokens:
        """Encode once, ask many: a Tokens result is reused as is."""
        if isinstance(image, Tokens):
            return dataclasses.replace(image, timings=dict(image.timings))  # own timings per call
        return self.tokenize(image)

    def _llm(self, embeds: np.ndarray) -> dict[str, np.ndarray]:
        """One prefill pass returning every output (segmentation reads all hidden states)."""
        return self.stage("llm").run(prefill_feeds(self.manifest.stage("llm"), embeds))

    def decoder(self) -> Decoder:
        """A fresh KV-cache decoder of the llm stage (cache kept where the backend's tensors live):
        `step(embeds)` prefills or decodes and returns (logits, hidden); `close()` when done."""
        return self.stage("llm").decoder(1)

    def _prefill(self, decoder: Decoder, embeds: np.ndarray, head: list[int] | None, info: dict) -> np.ndarray:
        """The prompt's prefill; with `head` (the token ids before the image), its KV comes from the
        prefix cache when an earlier call left it there, and is left there otherwise."""
        usable = head and self.prefix_cache.max_entries > 0 and hasattr(decoder, "snapshot") and len(head) < embeds.shape[1]
        if not usable:
            return decoder.step(embeds)[0]
        key = tuple(int(i) for i in head)
        state = self.prefix_cache.get(key)
        if state is None:
            decoder.step(embeds[:, : len(key)])
            self.prefix_cache.put(key, decoder.snapshot())
        else:
            decoder.restore(state)
            info["cached_tokens"] = len(key)
        return decoder.step(embeds[:, len(key):])[0]

    def decode(self, embeds: np.ndarray, t: dict[str, float], s: SamplingParams, guide: Guide | None = None,
                head: list[int] | None = None, info: dict | None = None,
                embed: Callable[[int], np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (token id, hidden state of that token once fed back); greedy when temperature == 0.
        `embed(id)`: the (1, 1, H) input a picked id is fed back as (default: its embedding row);
        called after the caller has seen every earlier yield."""
        n = s.max_new_tokens or 64
        limit = self.max_context
        if embeds.shape[1] + n > limit:
            raise InputError(f"prompt of {embeds.shape[1]} tokens + {n} new exceeds the context of {limit}")
        rng = np.random.default_rng(s.seed)
        info = {} if info is None else info
        decoder = self.decoder()
        try:
            with timed(t, "llm_prefill"):
                logits = self._prefill(decoder, embeds, head, info)
            for _ in range(n):
                tok = pick(logits[0], s, rng, guide.allowed() if guide is not None else None)
                if tok == self.ids["<eos>"]:
                    return
                if guide is not None:
                    guide.advance(tok)
                fed = self.embeddings[[tok]][None] if embed is None else embed(tok)
                with timed(t, "llm_decode"):
                    logits, hidden = decoder.step(fed)
                yield tok, hidden[0]
        finally:  # also when the caller stops early (a deadline, a closed stream)
            decoder.close()

    def _finish(self, ids: list[int], s: SamplingParams) -> tuple[str, bool]:
        """Decoded, stripped text cut before the first stop string, and whether one was found."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not s.stop:
            return text.strip(), False
        cut, stopped = cut_at_stop(text.strip(), s.stop)
        return cut.strip(), stopped

    def _complete(self, embeds: np.ndarray, vt: Tokens, s: SamplingParams, due: float | None,
                  head: list[int] | None = None, guide: Guide | None = None, guided: Structure | None = None) -> Text:
        ids: list[int] = []
        complete, info = True, {}
        for tok, _ in self.decode(embeds, vt.timings, s, guide, head, info):
            ids.append(tok)
            if s.stop and self._finish(ids, s)[1]:
                break
            if due is not None and time.monotonic() >= due:
                complete = False  # checked between tokens: a step in flight is never abandoned
                break
        text, stopped = self._finish(ids, s)
        value = None
        if guide is not None:
            if guide.accepting and not stopped:
                value = guided.value(text)
            else:
                complete = False
        return Text(text, ids, vt.timings, complete, value, info.get("cached_tokens", 0), vt.frame)


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """The sampler with the old positional arguments (kept for callers of the private name)."""
    return pick(logits, SamplingParams(temperature=temperature, top_k=top_k), rng)


def _due(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    if not deadline > 0:
        raise InputError(f"deadline={deadline!r}; expected seconds > 0")
    return time.monotonic() + deadline


def _check_text(text: Any, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what}: got {text!r}; expected a non-empty string")
    return text.strip()


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))
