"""Triton Python-backend model `setok_pipeline`: image + question -> answer.

`setok.serve.export_triton` copies this file verbatim to `<repo>/setok_pipeline/1/model.py`. It
chains the stage models through BLS the way `setok.runtime.Pipeline.answer` chains ONNX sessions:
encoder -> cluster -> merger -> exactly `num_tokens` vision tokens -> projector -> llm (prefill,
then greedy decode with the KV cache) -> text. It imports neither torch nor setok: the server's
Python needs numpy, tokenizers and Pillow only. Its settings come from `setok_pipeline.json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:  # only inside the Triton Python backend; the module still imports (and is tested) elsewhere
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None

log = logging.getLogger("setok_pipeline")

SETTINGS_FILE = "setok_pipeline.json"
TOKENIZER_FILE = "tokenizer.json"
EMBEDDINGS_FILE = "llm_embeddings.npy"
# Tensor names of the stage models (they mirror setok.manifest; a test keeps them in step). The
# KV-cache names come from the settings (the manifest's), never from here.
PIXEL_VALUES, PATCH_FEATURES = "pixel_values", "patch_features"
ASSIGNMENT, NUM_TOKENS, VISION_TOKENS, EMBEDS = "assignment", "num_tokens", "vision_tokens", "embeds"
LOGITS = "logits"
INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS = "inputs_embeds", "attention_mask", "position_ids"
# The stage models this one calls by name (the cluster stage's name comes from the settings).
CHAINED_STAGES = ("encoder", "merger", "projector", "llm")
MAX_PIXELS = 40_000_000  # as setok's loader: refuse absurd images before resizing

# call(model_name, inputs, requested_output_names) -> outputs; BLS on the server, anything in tests.
StageCall = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


class RequestError(ValueError):
    """A bad request (image, question) or a failed stage call: answered as an error, not a crash."""


# ---- preprocessing (mirrors setok.runtime.preprocess) ------------------------------------------
def preprocess(image: np.ndarray, size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (1, 3, size, size) float32: shorter side to size (bicubic), center crop."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise RequestError(f"IMAGE: shape {list(image.shape)} {image.dtype}; expected [H, W, 3] uint8")
    h, w = image.shape[:2]
    if h < 1 or w < 1 or h * w > MAX_PIXELS:
        raise RequestError(f"IMAGE: {w}x{h} pixels; expected 1..{MAX_PIXELS} pixels")
    rgb = image if (h, w) == (size, size) else _resize_crop(image, size)
    x = rgb.astype(np.float32).transpose(2, 0, 1)[None] / 255.0  # (H, W, 3) -> (1, 3, H, W)
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def split_prompt(template: str, **fields: str) -> tuple[str, str]:
    """As setok.manifest.split_prompt (a test keeps them in step): {image} marks where the vision
    tokens go; a template without it puts the image first."""
    before, slot, after = template.partition("{image}")
    if not slot:
        before, after = "", template
    return before.format(**fields).strip(), after.format(**fields).strip()


def _resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image  # lazy: a size x size image needs no resize and no Pillow

    h, w = image.shape[:2]
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


# ---- the pipeline, independent of Triton (the BLS call is injected) -----------------------------
class SetokPipeline:
    def __init__(self, settings: dict, embeddings: np.ndarray, tokenizer, call: StageCall):
        self.s, self.embeddings, self.tokenizer, self.call = settings, embeddings, tokenizer, call
        self.ids = settings["special_ids"]
        self.past_names = [p["name"] for p in settings["past"]]
        self.present_names = [p["present"] for p in settings["past"]]

    def answer(self, image: np.ndarray, question: str, max_new_tokens: int) -> tuple[str, int]:
        """The answer text and the number of vision tokens the LLM saw."""
        question = question.strip()
        if not question:
            raise RequestError("QUESTION: empty; expected a non-empty string")
        vision = self.vision_tokens(preprocess(image, self.s["size"], self.s["mean"], self.s["std"]))
        embeds = self.prefix(vision, *split_prompt(self.s["question_prompt"], q=question))
        ids = self.decode(embeds, max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip(), int(vision.shape[0])

    def vision_tokens(self, px: np.ndarray) -> np.ndarray:
        """(1, 3, H, W) -> (K, D): exactly num_tokens tokens, the merger's padding cut off."""
        feats = self.call("encoder", {PIXEL_VALUES: px}, [PATCH_FEATURES])[PATCH_FEATURES]
        c = self.call(self.s["cluster_stage"], {PATCH_FEATURES: feats}, [ASSIGNMENT, NUM_TOKENS])
        merged = self.call("merger", {PATCH_FEATURES: feats, ASSIGNMENT: c[ASSIGNMENT], NUM_TOKENS: c[NUM_TOKENS]},
                           [VISION_TOKENS])[VISION_TOKENS]
        k = int(c[NUM_TOKENS][0])
        return merged[0, :k]

    def prefix(self, vision: np.ndarray, before: str, after: str) -> np.ndarray:
        """Embeddings of <bos> before <im_start> V.. <im_end> after as (1, L, H) float32."""
        projected = self.call("projector", {VISION_TOKENS: np.ascontiguousarray(vision, np.float32)}, [EMBEDS])[EMBEDS]
        head = self.embeddings[[self.ids["<bos>"]] + self.encode(before) + [self.ids["<im_start>"]]]
        tail = self.embeddings[[self.ids["<im_end>"]] + self.encode(after)]
        return np.concatenate([head, projected, tail])[None].astype(np.float32)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, embeds: np.ndarray, max_new_tokens: int) -> list[int]:
        """Greedy decode; the KV cache round-trips through the stateless `llm` model."""
        length = embeds.shape[1]
        if length + max_new_tokens > self.s["max_positions"]:
            raise RequestError(f"prompt of {length} tokens + {max_new_tokens} new exceeds the context of "
                               f"{self.s['max_positions']}")
        out = self.llm(embeds, self.empty_past(), 0)
        ids: list[int] = []
        for step in range(max_new_tokens):
            tok = int(np.argmax(out[LOGITS][0, -1]))
            if tok == self.ids["<eos>"]:
                break
            ids.append(tok)
            if step + 1 < max_new_tokens:  # the last token's hidden state is not needed
                past = {p: out[q] for p, q in zip(self.past_names, self.present_names)}
                out = self.llm(self.embeddings[[tok]][None].astype(np.float32), past, length)
                length += 1
        return ids

    def llm(self, embeds: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
        n = embeds.shape[1]
        feeds = {INPUTS_EMBEDS: embeds, ATTENTION_MASK: np.ones((1, past_len + n), np.int64),
                 POSITION_IDS: np.arange(past_len, past_len + n, dtype=np.int64)[None], **past}
        return self.call("llm", feeds, [LOGITS, *self.present_names])

    def empty_past(self) -> dict[str, np.ndarray]:
        return {p["name"]: np.zeros((1, p["heads"], 0, p["head_dim"]), np.float32) for p in self.s["past"]}


def load_pipeline(model_dir: Path, call: StageCall) -> SetokPipeline:
    from tokenizers import Tokenizer

    settings = json.loads((model_dir / SETTINGS_FILE).read_text())
    embeddings = np.load(model_dir / EMBEDDINGS_FILE)
    return SetokPipeline(settings, embeddings, Tokenizer.from_file(str(model_dir / TOKENIZER_FILE)), call)


# ---- Triton glue --------------------------------------------------------------------------------
def bls_call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """One synchronous BLS request to a stage model; outputs come back as numpy arrays on the CPU."""
    kwargs = {}
    if hasattr(pb_utils, "PreferredMemory"):  # GPU stages: ask for CPU outputs so as_numpy() works
        kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
    request = pb_utils.InferenceRequest(
        model_name=model, requested_output_names=outputs,
        inputs=[pb_utils.Tensor(name, np.ascontiguousarray(arr)) for name, arr in inputs.items()], **kwargs)
    response = request.exec()
    if response.has_error():
        raise RequestError(f"stage {model}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def _question(request) -> str:
    raw = pb_utils.get_input_tensor_by_name(request, "QUESTION").as_numpy().reshape(-1)
    if raw.size != 1:
        raise RequestError(f"QUESTION: {raw.size} strings; expected 1")
    value = raw[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise RequestError("QUESTION: not valid UTF-8") from None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = json.loads(args["model_config"]).get("parameters", {})
        self.max_new_tokens = int(params.get("max_new_tokens", {}).get("string_value", "8"))
        self.pipeline = load_pipeline(Path(__file__).resolve().parent, bls_call)
        log.info("setok_pipeline ready (max_new_tokens=%d)", self.max_new_tokens)

    def execute(self, requests: list) -> list:
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            image = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            text, k = self.pipeline.answer(image, _question(request), self.max_new_tokens)
        except RequestError as e:  # this request fails; the others in the same call still run
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("TEXT", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("NUM_TOKENS", np.array([k], dtype=np.int64)),
        ])

    def finalize(self) -> None:
        self.pipeline = None
