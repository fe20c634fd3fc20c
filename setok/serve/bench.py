"""Load a `setok serve` process on loopback and measure it: requests/s and latency percentiles at
several numbers of concurrent clients, for one or more --max-batch settings. Prints JSON.

    python -m setok.serve.bench BUNDLE [--clients 1,4,16] [--requests 200] [--max-batch 1,8] [--triton] [--json out.json]

Each client is a thread with its own keep-alive HTTP connection (the standard library's
http.client) sending OpenAI chat completions with `--images` distinct synthetic scenes in turn.
With --triton the same images and question also go, at the same client counts, to the bundle's
Triton model repository (`setok_pipeline`) on PyPI's nvidia-pytriton `tritonserver`, from the
Triton venv (see tests/serve/test_triton_live.py) through triton_load.py; every Triton answer must
equal the `setok serve` answer for its image. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
QUESTION = "how many objects are there"
MAX_TOKENS = 8
TRITON_VENV = Path(os.environ.get("SETOK_TRITON_VENV", Path.home() / ".cache" / "setok" / "triton-venv"))


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


def chat_body(model: str, image_url: str, question: str = QUESTION, max_tokens: int = MAX_TOKENS, **extra) -> dict:
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


def bench(bundle: Path, clients: Sequence[int], requests: int, max_batches: Sequence[int], images: int = 16,
          triton: bool = False) -> dict:
    from setok.serve.server import model_name

    model = model_name(bundle)
    pictures = scenes(images)
    urls = [data_url(im) for im in pictures]
    bodies = [chat_body(model, urls[i % len(urls)]) for i in range(requests)]
    runs, expected = [], {}  # expected: image index -> the `setok serve` answer
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
                for i, a in enumerate(r.pop("answers")):
                    if a is not None and expected.setdefault(i % images, a) != a:
                        log.warning("setok serve answered image %d with %r, earlier %r", i % images, a, expected[i % images])
                runs.append({"path": "setok serve", "max_batch": mb, **r, "batches": n,
                             "mean_batch": round(requests / n, 2) if n else None})
        finally:
            stop_server(proc)
    if triton:
        runs += bench_triton(bundle, pictures, clients, requests, expected)
    return {"bundle": str(bundle), "model": model, "cpu_count": os.cpu_count(), "max_new_tokens": MAX_TOKENS,
            "distinct_images": images, "runs": runs}


def triton_root(python: Path) -> Path:
    """The nvidia-pytriton wheel's server directory, with its Python-backend stub where the backend looks."""
    code = "import pytriton, os, sys; print(os.path.dirname(pytriton.__file__)); print('%d.%d' % sys.version_info[:2])"
    found, version = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                                    timeout=60).stdout.split()
    root = Path(found) / "tritonserver"
    stub = root / "backends" / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        shutil.copy2(root / "python_backend_stubs" / version / stub.name, stub)
    return root


def bench_triton(bundle: Path, images: list[np.ndarray], clients: Sequence[int], requests: int, expected: dict,
                 venv: Path = TRITON_VENV, timeout: float = 180.0) -> list[dict]:
    """Rows {path: "triton", ...} measured by triton_load.py under the venv's python."""
    from setok.serve import export_triton

    python = venv / "bin" / "python"
    if not (venv / "ok").is_file():
        raise FileNotFoundError(f"no Triton venv at {venv}: run tests/serve/test_triton_live.py once to create it")
    root = triton_root(python)
    with tempfile.TemporaryDirectory(prefix="setok-bench-triton-") as tmp:
        work = Path(tmp)
        repo = export_triton(bundle, work / "repo", max_new_tokens=MAX_TOKENS, stage_backend="python",
                             python_env=str(venv))
        np.save(work / "images.npy", np.stack(images))
        ports = [free_port() for _ in range(3)]
        # The stub links libpython3.x by name: this interpreter's must win over the distribution's.
        env = {**os.environ, "LD_LIBRARY_PATH": f"{Path(sys.base_prefix) / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        cmd = [str(root / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory",
               str(root / "backends"), "--http-address", HOST, "--grpc-address", HOST, "--http-port", str(ports[0]),
               "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--allow-metrics", "false",
               "--exit-timeout-secs", "10"]
        logpath = Path(os.environ.get("TMPDIR", "/tmp")) / f"setok-tritonserver-{ports[0]}.log"
        log.info("starting tritonserver on %s:%d (log %s)", HOST, ports[0], logpath)
        with open(logpath, "wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            due = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {proc.returncode}: "
                                       f"{logpath.read_text(errors='replace')[-1500:]}")
                try:
                    if get(ports[0], "/v2/models/setok_pipeline/ready")[0] == 200:
                        break
                except OSError:
                    pass  # not listening yet
                if time.monotonic() > due:
                    raise TimeoutError(f"tritonserver not ready after {timeout} s (log {logpath})")
                time.sleep(0.5)
            script = Path(__file__).with_name("triton_load.py")
            out = subprocess.run([str(python), str(script), str(ports[0]), str(work / "images.npy"), QUESTION,
                                  "--clients", ",".join(map(str, clients)), "--requests", str(requests)],
                                 capture_output=True, text=True, timeout=1800, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"triton_load.py exited with {out.returncode}: {out.stderr[-2000:]}")
        finally:
            log.info("tritonserver stopped: %s", stop_server(proc))
    log.info("checking Triton answers against %d distinct setok serve answers for %d images",
             len(set(expected.values())), len(images))
    rows = []
    for r in json.loads(out.stdout)["runs"]:
        answers = r.pop("answers")
        wrong = [(i, a, expected.get(i % len(images))) for i, a in enumerate(answers)
                 if a is not None and a != expected.get(i % len(images))]
        for i, got, want in wrong[:3]:
            log.error("triton answered request %d (image %d) with %r; setok serve: %r", i, i % len(images), got, want)
        rows.append({"path": "triton", **r, "mismatches": len(wrong)})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", default="1,4,16", help="Comma-separated numbers of concurrent clients.")
    ap.add_argument("--requests", type=int, default=200, help="Requests per measurement.")
    ap.add_argument("--max-batch", default="1,8", help="Comma-separated --max-batch settings to compare.")
    ap.add_argument("--triton", action="store_true", help="Also measure the Triton path (needs the Triton venv).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]
    result = bench(args.bundle, ints(args.clients), args.requests, ints(args.max_batch), triton=args.triton)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
