"""The runtime: chains the bundle's stages with no torch import. It reads only the manifest and
the files it names. Every result carries per-stage timings (seconds)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from setok import manifest as M
from setok.backends.base import Backend
from setok.backends.decode import Decoder, prefill_feeds
from setok.backends.onnxrt.session import OrtBackend
from setok.errors import BundleError, InputError
from setok.runtime.masks import pixel_owners, token_masks
from setok.runtime.preprocess import normalize, to_rgb_array

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    tokens: np.ndarray  # (K, D) exactly num_tokens vision tokens
    assignment: np.ndarray  # (N,) token id per patch
    centers: np.ndarray  # (K,) center patch per token
    masks: np.ndarray  # (K, H, W) bool: the pixels each token owns
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Text:
    text: str
    token_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    complete: bool = True  # False when a deadline cut the decode short


@dataclass
class Mask:
    mask: np.ndarray  # (H, W) bool
    selected: np.ndarray  # (K,) bool
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Image:
    image: np.ndarray  # (H, W, 3) uint8
    num_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    def __init__(self, bundle: Path, manifest: M.Manifest, backend: str, providers, threads, engines: Path | None = None,
                 spin: bool = True, max_context: int | None = None):
        self.bundle, self.manifest, self.backend, self.engines = bundle, manifest, backend, engines
        self.spin = spin
        self.providers, self.threads = providers, threads
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        cfg = manifest.config
        self.size = manifest.preprocessing["size"]
        self.patch = cfg["encoder"]["patch_size"]
        self.grid = self.size // self.patch
        self.max_tokens = manifest.stage("detokenizer").inputs[0].shape[1]
        self.ids = manifest.text["special_ids"]
        # The LLM's context: what the bundle was exported for, capped by the caller (a robot may
        # give a 32k-context LLM a few hundred positions to bound its KV cache).
        self.max_context = min(int(manifest.text["max_positions"]), max_context or 1 << 62)
        self.prompts = manifest.text["prompts"]
        self.embeddings = np.load(M.inside(bundle, manifest.files["embeddings"]["file"])).astype(np.float32)
        self.tokenizer = _load_tokenizer(M.inside(bundle, manifest.files["tokenizer"]["file"]))

    @classmethod
    def open(cls, bundle: str | Path, backend: str = "onnxruntime", providers: list | None = None,
             threads: int | None = None, spin: bool = True, max_context: int | None = None) -> Pipeline:
        """Open a bundle (backend "onnxruntime") or an engines directory written by `setok build`
        (backend "tensorrt"): the manifest is read and every file's sha256 checked; sessions are lazy."""
        bundle = Path(bundle)
        if backend == "onnxruntime":
            return cls(bundle, M.load_manifest(bundle), backend, providers, threads, spin=spin, max_context=max_context)
        if backend == "tensorrt":
            if not (bundle / "engines.json").is_file():
                raise InputError(f"{bundle}: no engines.json; backend 'tensorrt' opens a directory written by `setok build`")
            contract = bundle / "bundle"
            return cls(contract, M.load_manifest(contract, stages=False), backend, providers, threads, engines=bundle,
                       max_context=max_context)
        raise InputError(f"backend {backend!r}; expected 'onnxruntime' or 'tensorrt'")

    def stage(self, name: str) -> Backend:
        with self._lock:  # sessions are created once, lazily; ORT sessions are thread-safe to run
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

    def warmup(self) -> None:
        self.caption(np.zeros((self.size, self.size, 3), np.uint8), max_new_tokens=2)

    # ---- vision -----------------------------------------------------------------------------
    def tokenize(self, image: Any, cluster_stage: str = "cluster") -> Tokens:
        """Image -> exactly num_tokens vision tokens and the pixel mask each one owns."""
        t: dict[str, float] = {}
        with timed(t, "preprocess"):
            rgb = to_rgb_array(image, self.size)
            px = normalize(rgb[None], self.manifest.preprocessing["mean"], self.manifest.preprocessing["std"])
        return self._tokenize_pixels(px, t, cluster_stage)

    def tokenize_batch(self, images: list) -> list[Tokens]:
        """Several images through the vision stages in one batched run each (one Tokens per image;
        each carries the batch's stage timings)."""
        if not images:
            raise InputError("tokenize_batch: got no images; expected at least one")
        t: dict[str, float] = {}
        with timed(t, "preprocess"):
            rgb = np.stack([to_rgb_array(im, self.size) for im in images])
            px = normalize(rgb, self.manifest.preprocessing["mean"], self.manifest.preprocessing["std"])
        return self._tokenize_all(px, t)

    def _tokenize_pixels(self, px: np.ndarray, t: dict[str, float], cluster_stage: str = "cluster") -> Tokens:
        return self._tokenize_all(px, t, cluster_stage)[0]

    def _tokenize_all(self, px: np.ndarray, t: dict[str, float], cluster_stage: str = "cluster") -> list[Tokens]:
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
            # each token's cluster at pixel resolution (borders follow colour edges)
            owners = pixel_owners(assignment, to_unit_rgb(px[i], self.manifest.preprocessing), self.grid, self.patch, k)
            masks = token_masks(owners, k)
            out.append(Tokens(tokens[i, :k], assignment, c[M.CENTERS][i, :k], masks, dict(t)))
        return out

    # ---- language ---------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _prompt(self, vt: Tokens, template: str, **fields: str) -> tuple[np.ndarray, int]:
        """Embeddings of <bos> before <im_start> V.. <im_end> after (the manifest's prompt template
        filled in): exactly num_tokens vision slots. Returns them and the first vision slot."""
        t = vt.timings
        with timed(t, "projector"):
            vision = self.stage("projector").run({M.VISION_TOKENS: vt.tokens.astype(np.float32)})[M.EMBEDS]
        before, after = M.split_prompt(template, **fields)
        head = self.embeddings[[self.ids["<bos>"]] + self._encode(before) + [self.ids["<im_start>"]]]
        tail = self.embeddings[[self.ids["<im_end>"]] + self._encode(after)]
        return np.concatenate([head, vision, tail])[None], len(head)  # (1, L, H), first vision slot

    def caption(self, image: Any, max_new_tokens: int = 64, deadline: float | None = None, **sampling) -> Text:
        """Describe the image. `deadline` (seconds from now) returns what was decoded by then."""
        due = _due(deadline)
        vt = self._as_tokens(image)
        embeds, _ = self._prompt(vt, self.prompts["caption"])
        return self._complete(embeds, vt.timings, max_new_tokens, due, **sampling)

    def answer(self, image: Any, question: str, max_new_tokens: int = 8, deadline: float | None = None, **sampling) -> Text:
        """Answer a question about the image (or about a `Tokens` result: encode once, ask many)."""
        due = _due(deadline)
        question = _check_text(question, "question")
        vt = self._as_tokens(image)
        embeds, _ = self._prompt(vt, self.prompts["question"], q=question)
        return self._complete(embeds, vt.timings, max_new_tokens, due, **sampling)

    def answer_batch(self, images: list, questions: list[str], max_new_tokens: int = 8) -> list[Text]:
        """Greedy answers for several (image or Tokens, question) pairs in one batched LLM run:
        prompts left-padded, one prefill, one decode step per token for the whole batch."""
        if len(images) != len(questions) or not images:
            raise InputError(f"answer_batch: {len(images)} images and {len(questions)} questions; expected equal, >= 1")
        questions = [_check_text(q, "question") for q in questions]
        raw = [i for i, x in enumerate(images) if not isinstance(x, Tokens)]
        vts = list(images)
        for i, vt in zip(raw, self.tokenize_batch([images[i] for i in raw]) if raw else []):
            vts[i] = vt
        prompts = [self._prompt(vt, self.prompts["question"], q=q)[0][0] for vt, q in zip(vts, questions)]
        t: dict[str, float] = {}
        ids = self._greedy_batch(prompts, max_new_tokens, t)
        return [Text(self.tokenizer.decode(x, skip_special_tokens=True).strip(), x, {**vt.timings, **t})
                for x, vt in zip(ids, vts)]

    def _greedy_batch(self, prompts: list[np.ndarray], max_new_tokens: int, t: dict[str, float]) -> list[list[int]]:
        length = max(p.shape[0] for p in prompts)
        embeds = np.zeros((len(prompts), length, prompts[0].shape[1]), np.float32)
        mask = np.zeros((len(prompts), length), np.int64)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            embeds[i, length - p.shape[0]:], mask[i, length - p.shape[0]:] = p, 1
        if length + max_new_tokens > self.max_context:
            raise InputError(f"prompt of {length} tokens + {max_new_tokens} new exceeds the context of {self.max_context}")
        decoder = self.stage("llm").decoder(len(prompts))
        ids: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        with timed(t, "llm_prefill"):
            logits, _ = decoder.step(embeds, mask)
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1)
            for i in np.flatnonzero(~done):
                done[i] = nxt[i] == self.ids["<eos>"]
                if not done[i]:
                    ids[i].append(int(nxt[i]))
            if done.all():
                break
            with timed(t, "llm_decode"):
                logits, _ = decoder.step(self.embeddings[nxt][:, None])
        decoder.close()
        return ids

    def stream(self, image: Any, question: str | None = None, max_new_tokens: int = 64, **sampling) -> Iterator[str]:
        """Yield text pieces as they are decoded (a caption, or the answer to `question`)."""
        vt = self._as_tokens(image)
        if question is None:
            embeds, _ = self._prompt(vt, self.prompts["caption"])
        else:
            embeds, _ = self._prompt(vt, self.prompts["question"], q=_check_text(question, "question"))
        ids: list[int] = []
        text = ""
        for tok, _ in self._decode(embeds, vt.timings, max_new_tokens, **sampling):
            ids.append(tok)
            full = self.tokenizer.decode(ids, skip_special_tokens=True)
            if full != text:
                yield full[len(text):]
                text = full

    # ---- asyncio -----------------------------------------------------------------------------
    async def answer_async(self, image: Any, question: str, **kwargs) -> Text:
        """`answer` on a worker thread (the pipeline is thread-safe): an event loop stays responsive."""
        import asyncio

        return await asyncio.to_thread(self.answer, image, question, **kwargs)

    async def caption_async(self, image: Any, **kwargs) -> Text:
        import asyncio

        return await asyncio.to_thread(self.caption, image, **kwargs)

    async def astream(self, image: Any, question: str | None = None, max_new_tokens: int = 64, **sampling):
        """Async iterator of text pieces as they are decoded (the decode loop runs on a thread)."""
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def produce() -> None:
            try:
                for piece in self.stream(image, question, max_new_tokens, **sampling):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = loop.run_in_executor(None, produce)
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
        await worker

    def segment(self, image: Any, expression: str) -> Mask:
        expression = _check_text(expression, "expression")
        vt = self._as_tokens(image)
        embeds, first = self._prompt(vt, self.prompts["refer"], e=expression)
        t = vt.timings
        with timed(t, "llm_prefill"):
            out = self._llm(embeds)
        hidden = out[M.HIDDEN_STATES]  # (1, L, H)
        with timed(t, "seg_head"):
            logits = self.stage("seg_head").run({M.QUERY_HIDDEN: hidden[:, -1],
                                                 M.TOKEN_HIDDEN: hidden[:, first:first + vt.num_tokens]})[M.SEG_LOGITS]
        selected = logits[0] > 0
        mask = vt.masks[selected].any(0) if selected.any() else np.zeros((self.size, self.size), bool)
        return Mask(mask, selected, t)

    def generate_image(self, prompt: str) -> Image:
        """Text -> vision tokens at the LLM's <target> slots -> detokenizer; the LLM picks the count."""
        prompt = _check_text(prompt, "prompt")
        t: dict[str, float] = {}
        ids = [self.ids["<bos>"]] + self._encode(self.prompts["draw"].format(c=prompt))
        embeds = self.embeddings[ids][None]
        slots = [h for tok, h in self._decode(embeds, t, self.max_tokens + 3) if tok == self.ids["<target>"]]
        slots = slots[: self.max_tokens]
        tokens = np.zeros((1, self.max_tokens, self.vision_token_dim), np.float32)
        if slots:
            with timed(t, "regress_head"):
                tokens[0, : len(slots)] = self.stage("regress_head").run({M.HIDDEN: np.stack(slots).astype(np.float32)})[M.VISION_TOKENS]
        count = max(len(slots), 1)
        with timed(t, "detokenizer"):
            img = self.stage("detokenizer").run({M.VISION_TOKENS: tokens, M.NUM_TOKENS: np.array([count], np.int64)})[M.IMAGE]
        return Image(to_uint8(img[0], self.manifest.preprocessing), count, t)

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
    def _as_tokens(self, image: Any) -> Tokens:
        """Encode once, ask many: a Tokens result is reused as is."""
        if isinstance(image, Tokens):
            return dataclasses.replace(image, timings=dict(image.timings))  # own timings per call
        return self.tokenize(image)

    def _llm(self, embeds: np.ndarray) -> dict[str, np.ndarray]:
        """One prefill pass returning every output (segmentation reads all hidden states)."""
        return self.stage("llm").run(prefill_feeds(self.manifest.stage("llm"), embeds))

    def _decoder(self) -> Decoder:
        """The backend's own KV-cache decoder (cache kept where its tensors live)."""
        return self.stage("llm").decoder(1)

    def _decode(self, embeds: np.ndarray, t: dict[str, float], max_new_tokens: int,
                temperature: float = 0.0, top_k: int = 0, seed: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (token id, hidden state of that token once fed back); greedy when temperature == 0."""
        if not 1 <= max_new_tokens <= 4096:
            raise InputError(f"max_new_tokens={max_new_tokens}; expected 1..4096")
        limit = self.max_context
        if embeds.shape[1] + max_new_tokens > limit:
            raise InputError(f"prompt of {embeds.shape[1]} tokens + {max_new_tokens} new exceeds the context of {limit}")
        rng = np.random.default_rng(seed)
        decoder = self._decoder()
        try:
            with timed(t, "llm_prefill"):
                logits, _ = decoder.step(embeds)
            for _ in range(max_new_tokens):
                tok = _pick(logits[0], temperature, top_k, rng)
                if tok == self.ids["<eos>"]:
                    return
                with timed(t, "llm_decode"):
                    logits, hidden = decoder.step(self.embeddings[[tok]][None])
                yield tok, hidden[0]
        finally:  # also when the caller stops early (a deadline, a closed stream)
            decoder.close()

    def _complete(self, embeds: np.ndarray, t: dict[str, float], max_new_tokens: int, due: float | None,
                  **sampling) -> Text:
        ids: list[int] = []
        complete = True
        for tok, _ in self._decode(embeds, t, max_new_tokens, **sampling):
            ids.append(tok)
            if due is not None and time.monotonic() >= due:
                complete = False  # checked between tokens: a step in flight is never abandoned
                break
        return Text(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, t, complete)

    def close(self) -> None:
        for b in self._backends.values():
            b.close()
        self._backends.clear()


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        z[np.argsort(z)[:-top_k]] = -np.inf
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


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


def to_unit_rgb(chw: np.ndarray, pre: dict) -> np.ndarray:
    """Normalised (3, H, W) -> (H, W, 3) RGB in [0, 1] (what token masks compare colours in)."""
    x = chw * np.asarray(pre["std"], np.float32)[:, None, None] + np.asarray(pre["mean"], np.float32)[:, None, None]
    return x.transpose(1, 2, 0)


def to_uint8(chw: np.ndarray, pre: dict) -> np.ndarray:
    """Normalised (3, H, W) -> (H, W, 3) uint8."""
    return (np.clip(to_unit_rgb(chw, pre), 0, 1) * 255).round().astype(np.uint8)


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


@contextmanager
def timed(t: dict[str, float], key: str):
    """Add the block's wall time (seconds) to t[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        t[key] = t.get(key, 0.0) + time.perf_counter() - start
