"""The Triton model repository answering through a live tritonserver, over HTTP and gRPC.

The server is PyPI's nvidia-pytriton wheel (tritonserver 2.51, Python backend only), installed
with tritonclient in a separate venv (it pins numpy < 2, which our environment does not allow).
The stages therefore run as Python-backend models with ONNX Runtime (`stage_backend="python"`),
and every Python model runs its stub in that venv (`python_env`): the wheel's stub misreads
numpy 2 arrays (a BYTES input deserializes with a 0x1A1A1A1A length; tensors handed to BLS have
0 bytes), so it must import numpy 1.x. Skipped, with the reason, only if the venv cannot be
installed or the server binary cannot start.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from setok.runtime import Pipeline
from setok.serve import export_triton
from setok.serve.bench import HOST, free_port, scenes, stop_server

VENV = Path(os.environ.get("SETOK_TRITON_VENV", Path.home() / ".cache" / "setok" / "triton-venv"))
PACKAGES = ["nvidia-pytriton==0.7.0", "tritonclient[http,grpc]", "numpy<2", "onnxruntime", "tokenizers", "pillow"]
QUESTION = "how many objects are there"

CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tg, tritonclient.http as th
port_http, port_grpc, images = int(sys.argv[1]), int(sys.argv[2]), np.load(sys.argv[3])
out = {}
for name, mod, url in (("http", th, f"127.0.0.1:{port_http}"), ("grpc", tg, f"127.0.0.1:{port_grpc}")):
    client = mod.InferenceServerClient(url)
    out[name] = []
    for image in images:
        a = mod.InferInput("IMAGE", list(image.shape), "UINT8")
        a.set_data_from_numpy(image)
        q = mod.InferInput("QUESTION", [1], "BYTES")
        q.set_data_from_numpy(np.array([sys.argv[4].encode()], dtype=np.object_))
        r = client.infer("setok_pipeline", [a, q])
        out[name].append([r.as_numpy("TEXT")[0].decode(), int(r.as_numpy("NUM_TOKENS")[0])])
print(json.dumps(out))
"""


def _venv() -> Path:
    python = VENV / "bin" / "python"
    if not (VENV / "ok").is_file():
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], capture_output=True, text=True,
                             timeout=900, check=False)
        if pip.returncode != 0:
            pytest.skip(f"cannot install {PACKAGES} into a venv: {pip.stderr.strip().splitlines()[-1:]}")
        (VENV / "ok").write_text("\n".join(PACKAGES))
    return python


def _tritonserver(python: Path) -> Path:
    """The wheel's server, with its Python-backend stub where the backend looks for it."""
    found = subprocess.run([str(python), "-c", "import pytriton, os; print(os.path.dirname(pytriton.__file__))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    root = Path(found) / "tritonserver"
    stub = root / "backends" / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        shutil.copy2(root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / stub.name, stub)
    return root


@pytest.fixture(scope="module")
def triton(small_bundle, tmp_path_factory):
    python = _venv()
    root = _tritonserver(python)
    repo = export_triton(small_bundle, tmp_path_factory.mktemp("triton") / "repo", stage_backend="python",
                         python_env=VENV)
    ports = [free_port() for _ in range(3)]
    # The stub links libpython3.11 by name: this interpreter's must win over the distribution's.
    env = {**os.environ, "LD_LIBRARY_PATH": f"{Path(sys.base_prefix) / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    cmd = [str(root / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory",
           str(root / "backends"), "--http-address", HOST, "--grpc-address", HOST, "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--allow-metrics", "false"]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(proc, ports[0], log)
        yield python, ports
    finally:
        stop_server(proc)


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180.0) -> None:
    from setok.serve.bench import get

    due = time.monotonic() + timeout
    while time.monotonic() < due:
        if proc.poll() is not None:
            pytest.skip(f"tritonserver exited with {proc.returncode} before it was ready: "
                        f"{log.read_text(errors='replace').strip().splitlines()[-3:]}")
        try:
            if get(port, "/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tritonserver not ready after {timeout} s: {log.read_text(errors='replace')[-2000:]}")


def test_triton_answers_like_the_runtime_over_http_and_grpc(triton, small_bundle, tmp_path):
    import numpy as np

    python, ports = triton
    images = scenes(3)
    np.save(tmp_path / "images.npy", np.stack(images))
    out = subprocess.run([str(python), "-c", CLIENT, str(ports[0]), str(ports[1]), str(tmp_path / "images.npy"), QUESTION],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    pipe = Pipeline.open(small_bundle)
    expected = [[pipe.answer(im, QUESTION, max_new_tokens=8).text, pipe.tokenize(im).num_tokens] for im in images]
    assert len({text for text, _ in expected}) > 1, expected  # answers that differ: a real check
    assert got == {"http": expected, "grpc": expected}
