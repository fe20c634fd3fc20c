"""Load a `setok serve` process on loopback and measure it: requests/s and latency percentiles at
several numbers of concurrent clients, for one or more --max-batch settings. Prints JSON.

    python -m setok.serve.bench BUNDLE [--clients 1,4,16] [--requests 200] [--max-batch 1,8] [--json out.json]

Each client is a thread with its own keep-alive HTTP connection (the standard library's
http.client) sending OpenAI chat completions with `--images` distinct synthetic scenes in turn.
Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
QUESTION = "how many objects are there"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, *flags: str, env: dict | None = None) -> subprocess.Popen:
    """`setok serve BUNDLE --port PORT FLAGS...` in this interpreter; stderr goes to a log file."""
    cmd = [sys.executable, "-m", "setok.cli", "serve", str(bundle), "--host", HOST, "--port", str(port), *flags]
    logfile = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"setok-serve-{port}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    due = time.monotonic() + timeout
    while time.monotonic() < due:
        if proc.poll() is not None:
            raise RuntimeError(f"setok serve exited with {proc.returncode} before it was ready")
        try:
            if get(port, "/ready")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.1)
    raise TimeoutError(f"setok serve on port {port} not ready after {timeout} s")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM (graceful: in-flight requests finish), then the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_body(model: str, image_url: str, question: str = QUESTION, max_tokens: int = 8, **extra) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image_url}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


def scenes(n: int, seed: int = 5) -> list[np.ndarray]:
    from setok.data.items import eval_items  # the synthetic scenes: torch-free

    return [it.image for it in eval_items(n, seed=seed)]


def load(port: int, bodies: Sequence[dict], clients: int, timeout: float = 60.0, headers: dict | None = None) -> dict:
    """Send every body once, from `clients` threads; answers come back in the order of `bodies`."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    answers: list = [None] * len(bodies)
    latencies = np.zeros(len(bodies))
    errors: list[str] = []
    lock, nxt = threading.Lock(), iter(range(len(bodies)))

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                break
            payload = json.dumps(bodies[i]).encode()
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", payload, headers)
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
                continue
            latencies[i] = time.perf_counter() - start
            if r.status != 200:
                errors.append(f"{r.status}: {data[:200]!r}")
            else:
                answers[i] = json.loads(data)["choices"][0]["message"]["content"]
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ok = latencies[latencies > 0] * 1000
    return {"clients": clients, "requests": len(bodies), "errors": len(errors), "first_errors": errors[:3],
            "seconds": round(seconds, 3), "requests_per_s": round(len(bodies) / seconds, 2),
            "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok.size else None,
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok.size else None, "answers": answers}


def batch_sizes(port: int) -> dict:
    """Mean batch size and batch count, read from the server's /metrics."""
    text = get(port, "/metrics")[1].decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith(("setok_batch_size_sum", "setok_batch_size_count"))}
    count = values.get("setok_batch_size_count", 0)
    return {"batches": int(count), "mean_batch": round(values.get("setok_batch_size_sum", 0) / count, 2) if count else None}


def bench(bundle: Path, clients: Sequence[int], requests: int, max_batches: Sequence[int], images: int = 16) -> dict:
    from setok.serve.server import model_name

    model = model_name(bundle)
    urls = [data_url(im) for im in scenes(images)]
    bodies = [chat_body(model, urls[i % len(urls)]) for i in range(requests)]
    runs = []
    for mb in max_batches:
        port = free_port()
        proc = start_server(bundle, port, "--max-batch", str(mb), "--max-concurrency", str(max(clients) * 2))
        try:
            wait_ready(port, proc)
            load(port, bodies[: max(clients)], max(clients))  # warm every batch size once
            for c in clients:
                before = batch_sizes(port)
                r = load(port, bodies, c)
                after = batch_sizes(port)
                n = after["batches"] - before["batches"]
                r.pop("answers")
                runs.append({"max_batch": mb, **r, "batches": n,
                             "mean_batch": round(requests / n, 2) if n else None})
        finally:
            stop_server(proc)
    return {"bundle": str(bundle), "model": model, "cpu_count": os.cpu_count(), "max_new_tokens": 8,
            "distinct_images": images, "runs": runs}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", default="1,4,16", help="Comma-separated numbers of concurrent clients.")
    ap.add_argument("--requests", type=int, default=200, help="Requests per measurement.")
    ap.add_argument("--max-batch", default="1,8", help="Comma-separated --max-batch settings to compare.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]
    result = bench(args.bundle, ints(args.clients), args.requests, ints(args.max_batch))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
