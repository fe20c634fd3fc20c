"""`setok serve` with real clients on loopback: the official openai client, a bounded load test
(http.client threads), every refusal, the vision routes, admission, graceful shutdown.

Servers are real subprocesses (`setok serve BUNDLE ...`) on 127.0.0.1 with the shipped small
checkpoint's bundle; the reference answers come from `Pipeline.answer` in this process."""

import base64
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from setok.runtime import Pipeline
from setok.serve.bench import HOST, chat_body, data_url, get, load, scenes, stop_server
from setok.serve.images import rle_decode
from tests.serve.conftest import API_KEY, running

QUESTION = "how many objects are there"
COUNT = {"type": "integer", "minimum": 1, "maximum": 5}  # a schema the shipped tokenizer can spell
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def pipe(small_bundle):
    p = Pipeline.open(small_bundle)
    p.warmup()
    return p


@pytest.fixture(scope="module")
def server(small_bundle):
    with running(small_bundle, "--max-batch", "8", "--api-key", API_KEY) as (port, _):
        yield port


@pytest.fixture(scope="module")
def model(small_bundle):
    return small_bundle.name


@pytest.fixture(scope="module")
def images():
    return scenes(16)


@pytest.fixture(scope="module")
def serial(pipe, images):
    """Each scene's answer from the runtime, one call at a time."""
    answers = [pipe.answer(im, QUESTION, max_new_tokens=8).text for im in images]
    assert len(set(answers)) >= 3, f"the scenes must get different answers to test anything: {answers}"
    return answers


def client(port):
    from openai import OpenAI

    return OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def post(port, path, body, headers=AUTH, raw=None):
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("POST", path, raw if raw is not None else json.dumps(body), headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else None, dict(r.getheaders())
    finally:
        conn.close()


def messages(url, question=QUESTION):
    return [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}]


# ---- the openai client ------------------------------------------------------------------------
def test_openai_client_answers_like_the_runtime(server, model, pipe, images, serial):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [model]
    for im, expected in zip(images[:4], serial[:4]):
        url = data_url(im)
        r = c.chat.completions.create(model=model, messages=messages(url), max_tokens=8)
        assert r.choices[0].message.content == expected and r.choices[0].finish_reason in ("stop", "length")
        k = pipe.tokenize(im).num_tokens
        assert r.usage.vision_tokens == k == r.usage.prompt_tokens_details.image_tokens
        assert r.usage.completion_tokens == len(pipe.answer(im, QUESTION, max_new_tokens=8).token_ids)
        stream = c.chat.completions.create(model=model, messages=messages(url), max_tokens=8, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
        assert chunks[-1].usage.vision_tokens == k


def test_response_format_json_schema_is_the_runtimes_constrained_answer(server, model, pipe, images):
    """response_format json_schema -> Pipeline.answer(schema=...): the content always parses and fits."""
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": COUNT}}
    for im in images[:4]:
        r = c.chat.completions.create(model=model, messages=messages(data_url(im)), max_tokens=8, response_format=fmt)
        content = r.choices[0].message.content
        assert content == pipe.answer(im, QUESTION, max_new_tokens=8, schema=COUNT).text
        assert 1 <= json.loads(content) <= 5 and r.usage.vision_tokens == pipe.tokenize(im).num_tokens


def test_sampling_follows_the_runtime(server, model, pipe, images):
    c = client(server)
    url, im = data_url(images[0]), images[0]

    def ask(**kw):
        return c.chat.completions.create(model=model, messages=messages(url), max_tokens=12, **kw).choices[0].message.content

    for seed in (0, 1, 2):  # seeded sampling picks exactly the runtime's tokens
        assert ask(temperature=1.5, seed=seed) == pipe.answer(im, QUESTION, max_new_tokens=12, temperature=1.5,
                                                              seed=seed).text
    assert ask(temperature=1.5, seed=4, extra_body={"top_k": 3}) == pipe.answer(im, QUESTION, max_new_tokens=12, temperature=1.5,
                                                                top_k=3, seed=4).text
    # top_p (which the runtime lacks): a nucleus of one token is greedy decoding, at any temperature
    assert ask(temperature=2.0, seed=5, top_p=1e-9) == pipe.answer(im, QUESTION, max_new_tokens=12).text
    assert ask(temperature=1.5, seed=6, top_p=0.8) == ask(temperature=1.5, seed=6, top_p=0.8)


def test_stop_strings_cut_the_text_streamed_or_not(server, model, images):
    c = client(server)
    url = data_url(images[1])
    hot = {"temperature": 2.0, "max_tokens": 24, "extra_body": {"top_k": 50}}

    def create(**kw):
        return c.chat.completions.create(model=model, messages=messages(url), **hot, **kw)

    seed, full = next((s, t) for s in range(20) if len(t := create(seed=s).choices[0].message.content) >= 8)
    stop = full[4:7]
    expected = full[: full.find(stop)]
    r = create(seed=seed, stop=[stop, "\u2603never"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(create(seed=seed, stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    greedy = c.chat.completions.create(model=model, messages=messages(url), max_tokens=8, stop=["\u2603"])
    assert greedy.choices[0].message.content  # a stop string that never comes changes nothing (batched path)


# ---- load ----------------------------------------------------------------------------------------
def test_load_16_clients_no_errors_serial_answers_and_batches(server, model, images, serial):
    urls = [data_url(im) for im in images]
    bodies = [chat_body(model, urls[i % len(urls)]) for i in range(200)]
    before = _metric(server, "setok_batch_size_count")
    r = _load(server, bodies, 16)
    assert r["errors"] == 0, r["first_errors"]
    assert r["answers"] == [serial[i % len(serial)] for i in range(200)]
    batches = _metric(server, "setok_batch_size_count") - before
    assert batches < 200 * 0.75, f"{batches} runs for 200 concurrent requests: batching did not happen"


def test_batching_raises_throughput_over_max_batch_1(small_bundle, model, images, serial, tmp_path):
    """The same requests from 16 clients against `--max-batch 8` and `--max-batch 1`: same answers;
    --max-batch 1 never batches; batching serves more requests per CPU second of the server (its
    throughput once the cores are saturated). CPU time, unlike wall time, does not move with the
    neighbours' load on these shared cores; wall requests/s and p99 are recorded beside it (and
    measured idle by `python -m setok.serve.bench`). Both servers are up at once (idle, neither
    spins) and loaded in turn, three rounds of 64 requests each, so that a slow stretch of the
    machine falls on both alike rather than on one side of the ratio."""
    urls = [data_url(im) for im in images]
    bodies = [chat_body(model, urls[i % len(urls)]) for i in range(64)]
    expected = [serial[i % len(serial)] for i in range(64)]
    measured = {mb: {"requests": 0, "cpu_s": 0.0, "wall_s": 0.0, "runs": 0.0, "p99_ms": 0.0} for mb in (8, 1)}
    flags = ("--api-key", API_KEY)
    with running(small_bundle, "--max-batch", "8", *flags) as s8, running(small_bundle, "--max-batch", "1", *flags) as s1:
        servers = {8: s8, 1: s1}
        for port, _ in servers.values():
            _load(port, bodies[:16], 16)  # both servers warm their batch shapes before the measured runs
        for _ in range(3):
            for mb, (port, proc) in servers.items():
                runs, cpu = _metric(port, "setok_batch_size_count"), _cpu_seconds(proc.pid)
                r = _load(port, bodies, 16)
                cpu = _cpu_seconds(proc.pid) - cpu
                assert r["errors"] == 0 and r["answers"] == expected, r["first_errors"]
                m = measured[mb]
                m["requests"] += 64
                m["cpu_s"] += cpu
                m["wall_s"] += 64 / r["requests_per_s"]
                m["runs"] += _metric(port, "setok_batch_size_count") - runs
                m["p99_ms"] = max(m["p99_ms"], r["p99_ms"])
        port1 = servers[1][0]
        assert _metric(port1, "setok_batch_size_sum") == _metric(port1, "setok_batch_size_count")
    for m in measured.values():
        m.update(requests_per_s=round(m["requests"] / m.pop("wall_s"), 2), requests_per_cpu_s=round(m["requests"] / m["cpu_s"], 2),
                 cpu_s=round(m["cpu_s"], 2))
    (tmp_path / "serve_batching.json").write_text(json.dumps(measured))
    print(f"16 clients, 3 x 64 requests: {measured}")
    assert measured[1]["runs"] == 192 and measured[8]["runs"] < 192 * 0.75, measured
    gain = measured[8]["requests_per_cpu_s"] / measured[1]["requests_per_cpu_s"]
    assert gain > 1.05, f"batching served {gain:.2f}x the requests per CPU second of --max-batch 1: {measured}"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children (/proc/PID/stat fields 14-17)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _load(port, bodies, clients):
    return load(port, bodies, clients, headers={"Authorization": f"Bearer {API_KEY}"})


def _metric(port, name):
    text = get(port, "/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# ---- refusals ------------------------------------------------------------------------------------
def _png(w=64, h=64):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png_header(side=7000):
    """A valid PNG whose header claims side x side pixels (the body is a 1x1 image's)."""
    raw = bytearray(_png(1, 1))
    ihdr = 16  # 8 signature bytes + length + b"IHDR"
    raw[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[12:ihdr + 13])))
    return bytes(raw)


def _url(raw, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


BAD = [  # (name, body or raw bytes, status, words the message must contain)
    ("malformed-json", b"{not json", 400, "malformed JSON"),
    ("not-an-object", [1, 2], 400, "JSON object"),
    ("unknown-model", {"model": "gpt-4o"}, 400, "not served here"),
    ("no-messages", {"messages": []}, 400, "messages"),
    ("remote-url", {"url": "https://example.com/cat.png"}, 400, "never fetches"),
    ("bad-base64", {"url": "data:image/png;base64,@@@@"}, 400, "base64"),
    ("not-base64-data-url", {"url": "data:image/png,abc"}, 400, "not base64"),
    ("not-an-image", {"url": _url(b"hello world, not a picture")}, 400, "not a readable image"),
    ("no-image", {"messages": [{"role": "user", "content": QUESTION}]}, 400, "0 images"),
    ("two-images", {"two_images": True}, 400, "2 images"),
    ("no-question", {"question": "  "}, 400, "no text"),
    ("bad-role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("max-tokens-0", {"max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-over-context", {"max_tokens": 4000}, 400, "context"),
    ("temperature", {"temperature": 7}, 400, "temperature"),
    ("top-p-0", {"top_p": 0}, 400, "top_p"),
    ("seed", {"seed": "x"}, 400, "seed"),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("n", {"n": 2}, 400, "n=1"),
    ("json-object", {"response_format": {"type": "json_object"}}, 400, "json_schema"),
    ("json-schema-no-schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "schema"),
    ("json-schema-stream", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": COUNT}},
                            "stream": True}, 400, "stream"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("image-over-16MiB", {"url": _url(b"\0" * (17 * 1024 * 1024))}, 413, "at most"),
    ("image-over-40-megapixels", {"url": _url(_huge_png_header())}, 413, "pixels"),
    ("image-over-pil-bomb-limit", {"url": _url(_huge_png_header(20000))}, 413, "pixels"),
]


def _bad_body(model, spec):
    """A valid request changed by `spec`: url / question / two_images, other keys replace fields."""
    if isinstance(spec, (bytes, list)):
        return spec
    body = chat_body(model, spec.get("url", _url(_png())), spec.get("question", QUESTION))
    if spec.get("two_images"):
        body["messages"][0]["content"].append(body["messages"][0]["content"][1])
    body.update({k: v for k, v in spec.items() if k not in ("url", "question", "two_images")})
    return body


@pytest.mark.parametrize("name,spec,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_refused_with_one_line(server, model, name, spec, status, words):
    body = _bad_body(model, spec)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, out, _ = post(server, "/v1/chat/completions", None, raw=raw)
    assert code == status, out
    message = out["error"]["message"]
    assert words in message and "\n" not in message and out["error"]["code"] == status


def test_openai_client_sees_the_refusal(server, model):
    import openai

    with pytest.raises(openai.BadRequestError, match="never fetches"):
        client(server).chat.completions.create(model=model, messages=messages("http://10.0.0.1/a.png"))


def test_body_limit_auth_and_routes(server, model):
    # 413 from the Content-Length header alone: the body is never sent
    with socket.create_connection((HOST, server), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 999999999\r\n\r\n")
        head = b""
        for _ in range(20):  # headers and body may come in separate packets
            head += s.recv(65536)
            if head.rstrip().endswith(b"}"):
                break
        head = head.decode()
    assert head.startswith("HTTP/1.1 413") and "request body of 999999999 bytes" in head
    body = chat_body(model, _url(_png()))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        code, out, h = post(server, "/v1/chat/completions", body, headers={"Content-Type": "application/json", **headers})
        assert code == 401 and "API key" in out["error"]["message"] and h["www-authenticate"] == "Bearer"
    assert get(server, "/v1/models")[0] == 401
    assert [get(server, p)[0] for p in ("/health", "/ready", "/metrics")] == [200, 200, 200]  # probes stay open
    code, out, _ = post(server, "/v1/nothing", {})
    assert code == 404 and "/v1/nothing" in out["error"]["message"]
    code, _, _ = post(server, "/v1/models", {})
    assert code == 405


# ---- setok's own routes --------------------------------------------------------------------------
def test_segment_and_tokenize_in_the_clients_frame(server, model, pipe, images):
    """/v1/segment and /v1/tokenize answer in the pixels of the image the client sent: what
    Pipeline.segment / tokenize give for that same image (frame-coordinate results)."""
    im = images[2]
    expression = "the red circle"
    ref = pipe.segment(im, expression).mask
    for fmt in ("rle", "png"):
        code, out, _ = post(server, "/v1/segment", {"image": data_url(im), "expression": expression, "format": fmt})
        assert code == 200, out
        mask = rle_decode(out["mask"]) if fmt == "rle" else np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask"]["data"])))).astype(bool)
        np.testing.assert_array_equal(mask, ref)
        assert out["area"] == ref.sum() and out["num_tokens"] == pipe.tokenize(im).num_tokens
    # 2x larger: the mask is the frame's own (borders at its resolution), the model's 2x2 blocks inside
    big = np.kron(im, np.ones((2, 2, 1), np.uint8))
    code, out, _ = post(server, "/v1/segment", {"image": data_url(big), "expression": expression})
    got, want = rle_decode(out["mask"]), pipe.segment(big, expression)
    np.testing.assert_array_equal(got, want.mask)
    up = np.kron(want.mask_crop, np.ones((2, 2), bool))
    assert got.shape == (128, 128) and (got & up).sum() >= 0.8 * max(1, (got | up).sum())
    ys, xs = np.nonzero(got)
    assert out["box"] == ([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if xs.size else None)
    assert out["frame"]["frame_size"] == [128, 128] and out["size"] == [128, 128]
    # wider than tall: the model saw the central 64 columns; nothing outside them is in the mask
    wide = np.concatenate([images[3][:, :32], im, images[3][:, 32:]], axis=1)  # (64, 128, 3)
    code, out, _ = post(server, "/v1/segment", {"image": data_url(wide), "expression": expression})
    mask = rle_decode(out["mask"])
    assert mask.shape == (64, 128) and not mask[:, :32].any() and not mask[:, 96:].any()
    np.testing.assert_array_equal(mask, pipe.segment(wide, expression).mask)
    assert out["frame"]["crop_box"] == [32.0, 0.0, 96.0, 64.0]

    code, out, _ = post(server, "/v1/tokenize", {"image": data_url(wide)})
    vt = pipe.tokenize(im)
    assert code == 200 and out["num_tokens"] == vt.num_tokens and out["size"] == [128, 64]
    expected = [[(c % pipe.grid + 0.5) * pipe.patch + 32, (c // pipe.grid + 0.5) * pipe.patch] for c in vt.centers.tolist()]
    assert out["centers"] == expected and len(out["boxes"]) == len(out["centroids"]) == vt.num_tokens
    for b, (x, y) in zip(out["boxes"], expected):  # each token's box holds its center, inside the crop
        assert b is None or (32 <= b[0] <= x < b[2] <= 96 and 0 <= b[1] <= y < b[3] <= 64), (b, x, y)
    for bad, words in (({"image": data_url(im)}, "expression"), ({"image": data_url(im), "expression": "x", "format": "gif"}, "format"),
                       ({"image": "https://a/b.png", "expression": "x"}, "never fetches"), ({"expression": "x"}, "image")):
        code, out, _ = post(server, "/v1/segment", bad)
        assert code == 400 and words in out["error"]["message"], out


def test_health_ready_metrics(server):
    assert json.loads(get(server, "/health")[1]) == {"status": "ok"}
    assert json.loads(get(server, "/ready")[1])["status"] == "ready"
    text = get(server, "/metrics")[1].decode()
    for name in ('setok_requests_total{route="/v1/chat/completions",status="200"}', "setok_request_seconds_bucket",
                 'setok_stage_seconds_count{stage="encoder"}', 'setok_stage_seconds_count{stage="llm_prefill"}',
                 "setok_queue_depth", "setok_in_flight", "setok_batch_size_bucket", 'setok_tokens_total{kind="vision"}'):
        assert name in text, name


# ---- admission and shutdown ----------------------------------------------------------------------
def test_over_capacity_429_then_graceful_shutdown(small_bundle, model, images):
    url = data_url(images[0])
    with running(small_bundle, "--max-concurrency", "1") as (port, proc):
        results = []
        barrier = threading.Barrier(12)

        def one():
            barrier.wait()
            results.append(post(port, "/v1/chat/completions", chat_body(model, url), headers={}))

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(code for code, _, _ in results)
        assert set(codes) == {200, 429} and codes.count(200) >= 1, codes
        busy = next(r for r in results if r[0] == 429)
        assert busy[2]["retry-after"] == "1" and busy[1]["error"]["type"] == "rate_limit_error"
        # A stream in flight when SIGTERM comes still runs to its end (the longest of a few seeds).
        long = {"temperature": 2.0, "max_tokens": 160, "top_k": 50}
        full = {s: post(port, "/v1/chat/completions", chat_body(model, url, seed=s, **long), headers={})[1]
                for s in range(6)}
        seed = max(full, key=lambda s: full[s]["usage"]["completion_tokens"])
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(model, url, seed=seed, stream=True, **long)),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        first = r.readline()
        assert r.status == 200 and first.startswith(b"data: ")
        assert stop_server(proc) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        rest = r.read().decode()
        conn.close()
    events = [json.loads(line[6:]) for line in (first.decode() + rest).splitlines() if line.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == full[seed]["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == full[seed]["choices"][0]["finish_reason"]


def test_cli_refuses_with_one_line(small_bundle, tmp_path):
    out = subprocess.run([sys.executable, "-m", "setok.cli", "serve", str(tmp_path / "missing")], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: ")
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        out = subprocess.run([sys.executable, "-m", "setok.cli", "serve", str(small_bundle), "--port",
                              str(s.getsockname()[1])], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "cannot listen" in out.stderr.strip().splitlines()[-1]
