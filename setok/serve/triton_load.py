"""Load generator for `setok_pipeline` on a live tritonserver, run by setok.serve.bench with the
Triton venv's python as a plain script (it imports nothing of setok: that venv has no setok, and
tritonclient must stay out of the main environment).

    python triton_load.py PORT IMAGES.npy QUESTION --clients 1,4,16 --requests 100

Each client is a thread with its own tritonclient HTTP client; request i sends image
i % len(images). Writes one JSON object to stdout: {"runs": [{clients, requests, errors, ...,
"answers": [text per request]}]}. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # tritonclient exists only in the Triton venv this script runs in
    import tritonclient.http as th

MODEL = "setok_pipeline"


def _tritonclient():
    """tritonclient.http, imported where the script runs (the Triton venv), never at import:
    the package's modules must all import in the main environment, which has no tritonclient."""
    import tritonclient.http

    return tritonclient.http


def infer(client: th.InferenceServerClient, image: np.ndarray, question: str) -> str:
    th = _tritonclient()
    a = th.InferInput("IMAGE", list(image.shape), "UINT8")
    a.set_data_from_numpy(image)
    q = th.InferInput("QUESTION", [1], "BYTES")
    q.set_data_from_numpy(np.array([question.encode()], dtype=np.object_))
    r = client.infer(MODEL, [a, q], outputs=[th.InferRequestedOutput("TEXT")])
    return r.as_numpy("TEXT")[0].decode()


def load(url: str, images: np.ndarray, question: str, clients: int, requests: int, timeout: float) -> dict:
    answers: list = [None] * requests
    latencies = np.zeros(requests)
    errors: list[str] = []
    lock, nxt = threading.Lock(), iter(range(requests))

    def client() -> None:
        c = _tritonclient().InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        try:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    break
                start = time.perf_counter()
                try:
                    answers[i] = infer(c, images[i % len(images)], question)
                except Exception as e:  # noqa: BLE001 - counted and reported, not fatal
                    errors.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                latencies[i] = time.perf_counter() - start
        finally:
            c.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ok = latencies[latencies > 0] * 1000
    pct = lambda q: round(float(np.percentile(ok, q)), 1) if ok.size else None
    return {"clients": clients, "requests": requests, "errors": len(errors), "first_errors": errors[:3],
            "seconds": round(seconds, 3), "requests_per_s": round(requests / seconds, 2),
            "p50_ms": pct(50), "p99_ms": pct(99), "answers": answers}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("images")
    ap.add_argument("question")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=120.0, help="Seconds per request.")
    args = ap.parse_args()
    url, images = f"127.0.0.1:{args.port}", np.load(args.images)
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    load(url, images, args.question, max(clients), max(clients), args.timeout)  # warm-up, not reported
    runs = [load(url, images, args.question, c, args.requests, args.timeout) for c in clients]
    sys.stdout.write(json.dumps({"runs": runs}) + "\n")


if __name__ == "__main__":
    main()
