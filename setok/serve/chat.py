"""The OpenAI chat-completions wire format: a request body -> `ChatRequest`, a completion ->
the response object or the streamed chunks. Pure functions; every refusal is an InputError
(400) whose message names the field, what came and what is expected.

The model sees one image and one question: the image is the one `image_url` part of the user
messages (a follow-up question may come in a later message), the question is the text of the
last user message; system messages and earlier turns are not fed to the model, whose prompt
has no slot for them.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from setok.errors import InputError
from setok.serve.generate import MAX_NEW_TOKENS, Completion, Sampling
from setok.serve.images import image_bytes

DEFAULT_MAX_TOKENS = 64
ROLES = ("system", "developer", "user", "assistant")
# Fields whose non-default values the runtime cannot honour: refused rather than ignored.
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "logit_bias": None, "logprobs": False,
               "top_logprobs": None, "frequency_penalty": 0, "presence_penalty": 0, "audio": None}


class UnknownModel(InputError):
    pass


@dataclass(frozen=True)
class ChatRequest:
    image: bytes  # the encoded image from the data URL
    question: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    schema: dict | None = None  # response_format json_schema: the runtime's schema-constrained decoding


def parse_chat(body: Any, model: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise InputError(f"body: got {type(body).__name__}; expected a JSON object")
    check_model(body.get("model"), model)
    for key, default in UNSUPPORTED.items():
        if body.get(key, default) not in (default, None, [], {}):
            raise InputError(f"{key}: not supported by this server (setok answers with text only); omit it")
    if body.get("n", 1) != 1:
        raise InputError(f"n: got {body['n']!r}; this server returns one choice (n=1)")
    schema = _response_format(body.get("response_format"))
    image, question = _messages(body.get("messages"))
    stream = _typed(body, "stream", bool, False)
    if stream and schema is not None:
        raise InputError("response_format json_schema with stream: not supported (a constrained answer is a few "
                         "tokens); set stream to false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InputError(f"stream_options: got {options!r}; expected an object")
    return ChatRequest(image, question, _sampling(body), stream, bool(options.get("include_usage", False)), schema)


def check_model(value: Any, model: str) -> None:
    if value != model:
        raise UnknownModel(f"model: {value!r} is not served here; expected {model!r} (GET /v1/models)")


def _response_format(value: Any) -> dict | None:
    """OpenAI's response_format -> the JSON schema the decode is constrained to (None: free text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else value
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InputError(f"response_format json_schema: got {spec!r}; expected {{'name': ..., 'schema': {{...}}}}")
        return spec["schema"]  # the runtime checks it against the schema subset it constrains to
    if kind == "json_object":
        raise InputError("response_format 'json_object': free-form JSON is not constrained here; pass "
                         "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}")
    raise InputError(f"response_format: got {value!r}; expected {{'type': 'text'}} or {{'type': 'json_schema', ...}}")


def _messages(messages: Any) -> tuple[bytes, str]:
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: expected a non-empty list of {role, content} objects")
    images, last_user = [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"messages[{i}]: expected an object with role one of {list(ROLES)}")
        texts, urls = _parts(m.get("content"), f"messages[{i}].content")
        if m["role"] == "user":
            images += urls
            last_user = (i, " ".join(t.strip() for t in texts if t.strip()))
    if last_user is None:
        raise InputError("messages: no user message; expected one with an image_url part and a question")
    if len(images) != 1:
        raise InputError(f"messages: {len(images)} images; expected exactly one image_url part (the model sees one image)")
    if not last_user[1]:
        raise InputError(f"messages[{last_user[0]}]: no text; expected a question about the image")
    return image_bytes(images[0], "image_url"), last_user[1]


def _parts(content: Any, where: str) -> tuple[list[str], list[str]]:
    """(texts, image urls) of one message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise InputError(f"{where}: got {type(content).__name__}; expected a string or a list of parts")
    texts, urls = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            urls.append(ref.get("url") if isinstance(ref, dict) else ref)
        else:
            raise InputError(f"{where}[{j}]: expected {{'type': 'text', 'text': ...}} or "
                             "{'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}}")
    return texts, urls


def _sampling(body: dict) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise InputError(f"max_tokens: got {max_tokens!r}; expected an integer in 1..{MAX_NEW_TOKENS}")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise InputError("top_p: got 0; expected a number in (0, 1]")
    top_k = _typed(body, "top_k", int, 0)
    if top_k < 0:
        raise InputError(f"top_k: got {top_k}; expected an integer >= 0 (0: no limit)")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InputError(f"seed: got {seed!r}; expected a non-negative integer")
    return Sampling(max_tokens, temperature, top_p, top_k, seed, _stop(body.get("stop")))


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop: got {value!r}; expected a non-empty string or a list of up to 4")
    return tuple(stops)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{key}: got {value!r}; expected a number in [{low:g}, {high:g}]")
    return float(value)


def _typed(body: dict, key: str, kind: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(f"{key}: got {value!r}; expected {kind.__name__}")
    return value


# ---- responses ----------------------------------------------------------------------------------
def usage(c: Completion) -> dict:
    """OpenAI's usage plus `vision_tokens`: how many of the prompt tokens were the image's."""
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
            "total_tokens": c.prompt_tokens + len(c.token_ids), "vision_tokens": c.vision_tokens,
            "prompt_tokens_details": {"image_tokens": c.vision_tokens}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def response(c: Completion, model: str) -> dict:
    return {"id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": c.finish_reason}],
            "usage": usage(c), "timings_ms": {k: round(v * 1000, 3) for k, v in c.timings.items()}}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, usage_: dict | None = None,
          choices: bool = True) -> dict:
    """One `chat.completion.chunk`; the usage chunk (stream_options.include_usage) has no choices."""
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices else [],
            "usage": usage_}
