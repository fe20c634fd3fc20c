"""A kill at any moment leaves the old complete artifact or the new complete one, never half."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from setok import manifest as M


def _kill_during(args: list[str], after: float) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "setok.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(after)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _complete_or_old(dest, old_sha: str | None) -> str:
    """'new', 'old' or 'absent'; anything half-written fails."""
    if not dest.exists():
        assert old_sha is None, "the old bundle vanished"
        return "absent"
    M.load_manifest(dest)  # verifies every file's sha256
    sha = M.sha256(dest / "manifest.json")
    return "old" if sha == old_sha else "new"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_during_export(tiny_ckpt, tiny_bundle, tmp_path, seed):
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["setok_version"] = "old"  # mark the old bundle (still valid: the manifest is not hashed)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    old = M.sha256(dest / "manifest.json")
    after = random.Random(seed).uniform(2.0, 12.0)  # import, tracing, validation, writing, renaming
    _kill_during(["export", str(tiny_ckpt), "--out", str(dest)], after)
    assert _complete_or_old(dest, old) in ("old", "new")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "bundle"]
    assert all(p.startswith(".bundle.") for p in leftovers), leftovers  # only hidden temp dirs of a killed writer


def test_sigkill_during_train_leaves_a_loadable_checkpoint(tmp_path):
    from setok.model.setokim import Setokim

    out = tmp_path / "ck"
    _kill_during(["train", "--preset", "tiny", "--steps", "40", "--ckpt-every", "3", "--out", str(out)], 9.0)
    if out.exists():
        Setokim.from_pretrained(out)  # every checkpoint on disk is complete


def test_an_artifact_gets_normal_permissions_whatever_its_writers_chose(tmp_path):
    import os
    import stat

    from setok.io import atomic_dir

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "bundle") as tmp:
            fd = os.open(tmp / "llm.onnx_data", os.O_WRONLY | os.O_CREAT, 0o600)  # as optimum writes it
            os.close(fd)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.json").write_text("{}")
    finally:
        os.umask(umask)
    for f in ("llm.onnx_data", "sub/a.json"):
        assert stat.S_IMODE((tmp_path / "bundle" / f).stat().st_mode) == 0o644, f


def test_a_rewritten_file_gets_normal_permissions_too(tmp_path):
    """atomic_file's temp file is mkstemp's (0600); the file it becomes is as readable as any the user
    writes (a rewritten llm.onnx served by Triton under another user)."""
    import os
    import stat

    from setok.io import atomic_file, write_json

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "manifest.json", {"a": 1})
        with atomic_file(tmp_path / "llm.onnx") as tmp:
            tmp.write_bytes(b"graph")
    finally:
        os.umask(umask)
    for f in ("manifest.json", "llm.onnx"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644, f


def test_the_umask_is_read_without_being_changed():
    """Reading the umask never sets it (os.umask(0) for a moment would let another thread create a
    world-writable file); both ways of reading it agree with what the process set. The GIL switches
    threads every 1 us here, so a read that sets the umask is caught (the os.umask(0)-and-back read
    was seen by the watcher 1-18 times in 20,000 reads in each of five runs)."""
    import sys
    import threading

    from setok.io import _umask, _umask_probe

    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # what a concurrent thread would create files with
        while not stop.is_set():
            m = os.umask(0o027)
            seen.append(m)
            if m != 0o027:
                os.umask(m)

    old, interval = os.umask(0o027), sys.getswitchinterval()
    try:
        assert _umask() == _umask_probe() == 0o027
        sys.setswitchinterval(1e-6)
        t = threading.Thread(target=watch)
        t.start()
        for _ in range(50_000):
            _umask()
        stop.set()
        t.join()
        assert set(seen) == {0o027}, f"the umask was changed while being read: {sorted(set(seen))}"
    finally:
        sys.setswitchinterval(interval)
        os.umask(old)
