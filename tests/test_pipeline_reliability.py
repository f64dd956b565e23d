"""The batch runner as a new user meets it: killed runs, two runs on one folder, failed starts, an output
folder that is the input folder, and which errors skip an image versus stop the run.

A random-init ViT-Ti/16 at a tiny input size stands in for real weights (only reliability is tested here);
subprocess runs are slowed down from outside (``conftest.slowed_cli``) so that they can be acted on mid-way.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import slowed_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vit_tiny_patch16_224"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _images(d: Path, n: int = 6) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def _argv(inp, out, *extra):
    return ["segment", str(inp), "--out", str(out), "--model", MODEL, "--pretrained", "0", "--size", "32",
            "--threshold", "0.05", "--no-progress", *extra]


def _cli(argv):
    from ultra_fast.cli import main
    return main(argv)


def _ok_records(out: Path) -> int:
    m = out / "manifest.jsonl"
    return sum('"ok"' in line for line in m.read_text().splitlines()) if m.is_file() else 0


def _start_slow(argv, delay_s=1.0):
    return subprocess.Popen(slowed_cli(argv, delay_s), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(cond, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (rc {proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the run")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_9_leaves_no_worker_behind(tmp_path):
    """``kill -9`` of a running ``segment`` with DataLoader workers: within 10 s none of its processes lives."""
    inp, out = _images(tmp_path / "in", 8), tmp_path / "out"
    proc = _start_slow(_argv(inp, out, "--workers", "2"), delay_s=2.0)
    try:
        _wait_for(lambda: _ok_records(out) >= 1, proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the run has no DataLoader workers to leave behind"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(c) for c in children):
            time.sleep(0.1)
        left = [(c.pid, c.name()) for c in children if _alive(c)]
        assert not left, f"processes of the killed run still alive after 10 s: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    # the folder is not left locked: a resume finishes the rest
    assert _cli(_argv(inp, out, "--workers", "0")) == 0
    assert _ok_records(out) == 8


def test_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    inp, out = _images(tmp_path / "in"), tmp_path / "out"
    proc = _start_slow(_argv(inp, out, "--workers", "0"), delay_s=1.0)
    try:
        _wait_for(lambda: _ok_records(out) >= 1, proc)
        assert _cli(_argv(inp, out, "--workers", "0")) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and f"pid {proc.pid}" in err, err
        assert proc.poll() is None  # the first run was not disturbed
        proc.wait(180)
        assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert _ok_records(out) == 6
    assert not (out / ".ultra_fast.lock").exists()  # released (and removed) by the first run


def test_lock_is_exclusive_and_released(tmp_path):
    from ultra_fast.errors import UltraFastError
    from ultra_fast.pipeline import OutputBusyError, OutputLock
    with OutputLock(tmp_path / "o"):
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}") as e:
            OutputLock(tmp_path / "o").acquire()
        assert isinstance(e.value, UltraFastError)
    with OutputLock(tmp_path / "o"):  # free again
        pass


def test_a_run_that_fails_at_start_leaves_the_out_usable(tmp_path, capsys):
    inp, out = _images(tmp_path / "in", 2), tmp_path / "out"
    bad = _argv(inp, out, "--workers", "0")
    bad[bad.index("--model") + 1] = "nope_model"
    assert _cli(bad) == 2
    assert "nope_model" in capsys.readouterr().err
    assert not (out / "run.json").exists()
    assert _cli(_argv(inp, out, "--workers", "0", "--threshold", "0.1")) == 0  # other settings: accepted
    assert json.loads((out / "run.json").read_text())["threshold"] == 0.1
    assert _ok_records(out) == 2


def test_out_equal_to_the_input_folder_is_refused_every_time(tmp_path, capsys):
    inp = _images(tmp_path / "in", 2)
    before = sorted(p.relative_to(inp).as_posix() for p in inp.rglob("*"))
    for _ in range(2):  # the first run and a "resume" behave the same
        assert _cli(_argv(inp, inp, "--workers", "0")) == 2
        err = capsys.readouterr().err
        assert "is or contains the input folder" in err, err
        assert sorted(p.relative_to(inp).as_posix() for p in inp.rglob("*")) == before  # nothing written
    # an --out inside the input folder is fine, and skipped by the listing on every run
    assert _cli(_argv(inp, inp / "seg", "--workers", "0")) == 0
    assert _cli(_argv(inp, inp / "seg", "--workers", "0")) == 0
    recs = [json.loads(line) for line in (inp / "seg" / "manifest.jsonl").read_text().splitlines()]
    assert [r["name"] for r in recs] == ["im0", "im1"]


def test_engine_error_stops_the_run_and_resume_continues(tmp_path, monkeypatch):
    """A bug (here a RuntimeError from the segmentation) is not recorded as a bad image: the run stops
    with the exception; the finished image stays done and a rerun resumes after it."""
    import ultra_fast.pipeline.runner as runner
    inp, out = _images(tmp_path / "in", 3), tmp_path / "out"
    real, calls = runner.segment_tensors, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("engine bug")
        return real(*a, **k)

    monkeypatch.setattr(runner, "segment_tensors", flaky)
    with pytest.raises(RuntimeError, match="engine bug"):
        _cli(_argv(inp, out, "--workers", "1"))
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["ok"]
    assert not (out / ".ultra_fast.lock").exists()
    monkeypatch.setattr(runner, "segment_tensors", real)
    assert _cli(_argv(inp, out, "--workers", "0")) == 0
    assert _ok_records(out) == 3


def test_input_error_skips_only_that_image(tmp_path, monkeypatch, capsys):
    import ultra_fast.pipeline.runner as runner
    from ultra_fast.errors import InputError
    inp, out = _images(tmp_path / "in", 3), tmp_path / "out"
    real = runner.segment_tensors

    def picky(adapter, x, sizes, *a, **k):
        if tuple(sizes[0]) == (41, 50):  # im1
            raise InputError("this image cannot be segmented")
        return real(adapter, x, sizes, *a, **k)

    monkeypatch.setattr(runner, "segment_tensors", picky)
    assert _cli(_argv(inp, out, "--workers", "0")) == 0
    recs = {r["name"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert recs["im0"]["status"] == recs["im2"]["status"] == "ok"
    assert recs["im1"]["status"] == "error" and "cannot be segmented" in recs["im1"]["error"]
    assert "1 errors" in capsys.readouterr().err


def test_cli_shows_a_bug_with_its_traceback(monkeypatch):
    """Only UltraFastError and OSError become one-line messages; a TypeError from a bug propagates."""
    from ultra_fast.cli import main, segment_cmd
    from ultra_fast.errors import InputError

    def failing(exc):
        def run(args):
            raise exc
        return run
    monkeypatch.setattr(segment_cmd, "run", failing(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        main(["segment", "x", "--out", "y"])
    for exc in (InputError("bad input"), FileNotFoundError("no such file")):
        monkeypatch.setattr(segment_cmd, "run", failing(exc))
        assert main(["segment", "x", "--out", "y"]) == 2


def test_die_with_parent_kills_an_orphan():
    """The worker_init_fn on its own: a process that called it dies when its parent is SIGKILLed (without
    it, the sleeping grandchild below would outlive its parent indefinitely)."""
    code = ("import os, sys, time\n"
            "from ultra_fast.data.inputs import die_with_parent\n"
            "parent = os.getpid()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    die_with_parent(parent)\n"
            "    time.sleep(600)\n"
            "    os._exit(0)\n"
            "print(pid, flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(proc.stdout.readline()))
        time.sleep(0.5)  # let the child reach its sleep
        assert _alive(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 10
        while time.time() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child), "the orphan outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()
