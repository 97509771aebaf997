"""Runs that survive a cluster (issue 25): ``--resume auto``, preemption by SIGTERM / SIGUSR1,
checkpoints that a crash or a full disk cannot spoil, gradient accumulation, torchrun restarts.

The subprocess tests run the real CLI on the built-in tiny world and compare final weights with
an uninterrupted run's (exact resume: ≤ 1e-6)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from predet.engine.common import (
    MetricLogger,
    checkpoint_path,
    find_resume_checkpoint,
    remove_checkpoint_debris,
    save_training_checkpoint,
)
from predet.engine.loop import Checkpointer, train
from predet.engine.trainer import open_run
from predet.errors import UserError
from predet.utils import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "pretrain" / "tiny_cpu.yaml")
# 24 steps of 2 images: long enough to signal mid-run, a few seconds on 2 cores
RUN = ["train.steps=24", "train.batch_size=2", "train.warmup_steps=1", "train.log_every=1", "ckpt.every=100"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return load_checkpoint(checkpoint_path(run))["model"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _pretrain_cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "predet", "pretrain", "--config", TINY, "--out", str(run), "--resume", "auto",
            *RUN, *extra]  # fmt: skip


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------
def _state(step: int, value: float = 0.0) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "optimizer": {}, "scheduler": {}, "step": step}


def test_last_pt_that_does_not_load_falls_back_to_the_newest_step_file(tmp_path, capsys):
    for step in (2, 4):
        save_training_checkpoint(_state(step, step), tmp_path, periodic=True)
    save_training_checkpoint(_state(5, 5.0), tmp_path, periodic=False)
    path, ckpt = find_resume_checkpoint(tmp_path)
    assert path.name == "last.pt" and ckpt["step"] == 5
    last = checkpoint_path(tmp_path)
    last.write_bytes(last.read_bytes()[:100])  # cut, as a crash of the file system leaves it
    path, ckpt = find_resume_checkpoint(tmp_path)
    assert path.name == "step_000004.pt" and ckpt["step"] == 4 and ckpt["model"]["w"][0] == 4
    assert f"resuming from {path} instead" in capsys.readouterr().out
    for p in (tmp_path / "checkpoints").glob("step_*.pt"):
        p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UserError, match=r"no checkpoint of .* loads: cannot read checkpoint .*last.pt"):
        find_resume_checkpoint(tmp_path)
    assert find_resume_checkpoint(tmp_path / "none") is None


def test_a_failed_write_leaves_no_temporary_file_and_the_old_checkpoint(tmp_path, monkeypatch):
    save_training_checkpoint(_state(2, 2.0), tmp_path, periodic=False)

    def full_disk(obj, f, *a, **k):
        f.write(b"PK partial bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"^no space left on the device of .*checkpoints to write step_000004.pt: "
                                        r"it needs about 0 MB, \d+ MB are free"):  # fmt: skip
        save_training_checkpoint(_state(4, 4.0), tmp_path, periodic=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]
    assert load_checkpoint(checkpoint_path(tmp_path))["step"] == 2


def test_debris_of_a_killed_writer_is_removed_at_launch(tmp_path, capsys):
    save_training_checkpoint(_state(2), tmp_path, periodic=True)
    folder = tmp_path / "checkpoints"
    (folder / ".last.pt.tmp4242").write_bytes(b"PK half")
    (folder / ".step_000004.pt.tmp4242").write_bytes(b"PK half")
    assert [p.name for p in remove_checkpoint_debris(tmp_path)] == [".last.pt.tmp4242", ".step_000004.pt.tmp4242"]
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_000002.pt"]


def test_resume_auto_decides_from_the_folder(tmp_path, capsys):
    assert not open_run(tmp_path / "new", resume="auto", overwrite=False).resuming
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")  # a run that died before its first checkpoint
    start = open_run(run, resume="auto", overwrite=False)
    assert not start.resuming and start.overwrite
    assert f"{run} holds no checkpoint yet: starting the run there afresh" in capsys.readouterr().out
    save_training_checkpoint(_state(3), run, periodic=False)
    start = open_run(run, resume="auto", overwrite=False)
    assert start.resuming and start.state["step"] == 3 and start.path == checkpoint_path(run)
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match=r"--resume auto: run folder .*other holds neither a checkpoint nor a predet"):
        open_run(other, resume="auto", overwrite=False)
    with pytest.raises(UserError, match=r"--resume given but .*other holds no checkpoint .*use --resume auto"):
        open_run(other, resume=True, overwrite=False)


# --------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------
class _Linear(nn.Module):
    """No BatchNorm, no dropout: a k-micro-batch step equals one k-times batch exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = self.net(x).squeeze(1)
        return {"loss_mse": ((pred - y) ** 2).mean(), "mean_pred": pred.detach().mean()}


def _train_linear(tmp_path: Path, micro: list[tuple], accum: int, steps: int) -> tuple[nn.Module, list[dict]]:
    tmp_path.mkdir()
    model = _Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    logger = MetricLogger(tmp_path, tensorboard=False)
    ckpt = Checkpointer(tmp_path, model=model, optimizer=opt, scheduler=sched,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), every=1000)  # fmt: skip
    train(model, iter(micro), opt, sched, start=0, stop=steps, logger=logger, checkpointer=ckpt, log_every=1,
          images_per_step=8, progress=False, accum_steps=accum)  # fmt: skip
    return model, _rows(tmp_path)


def test_accumulating_micro_batches_equals_one_large_batch(tmp_path):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, generator=g)) for _ in range(3)]
    micro = [(x[i : i + 2], y[i : i + 2]) for x, y in batches for i in range(0, 8, 2)]
    big, big_rows = _train_linear(tmp_path / "big", batches, accum=1, steps=3)
    acc, acc_rows = _train_linear(tmp_path / "acc", micro, accum=4, steps=3)
    diff = max((a - b).abs().max().item() for a, b in zip(big.parameters(), acc.parameters()))
    assert diff <= 1e-6
    for a, b in zip(big_rows, acc_rows):  # the logged loss is the step's, the metrics the means
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["mean_pred"] == pytest.approx(b["mean_pred"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
    moved = max((a - b).abs().max().item() for a, b in zip(big.parameters(), _Linear().parameters()))
    assert moved > 1e-3  # it trained


# --------------------------------------------------------------------------------------------
# Preemption, end to end (slow: subprocesses on the built-in tiny world)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(builtin_cache, tmp_path_factory):
    from predet.data.builtin import resolve_builtin

    resolve_builtin("builtin:tiny", progress=False)
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = subprocess.run(_pretrain_cmd(run), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_at_the_step_reached_and_resume_auto_finishes_exactly(uninterrupted, tmp_path, sig):
    run = tmp_path / "run"
    cmd = _pretrain_cmd(run, "data.num_workers=1")
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    _wait_for_step(run, proc, 3)
    t0 = time.time()
    os.killpg(proc.pid, sig)  # as Slurm does: every process of the job, loader workers included
    _, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60
    assert proc.returncode == 128 + sig, err[-3000:]
    step = load_checkpoint(checkpoint_path(run))["step"]
    assert 3 <= step < 24
    lines = [x for x in err.splitlines() if x.startswith("predet:")]
    args = [a for a in cmd[3:] if a not in ("--resume", "auto")]
    assert lines == [f"predet: stopped by {signal.Signals(sig).name} at step {step}: saved "
                     f"{checkpoint_path(run)}; resume with: predet {' '.join(args)} --resume auto"]  # fmt: skip
    assert [r["step"] for r in _rows(run)] == list(range(1, step + 1))
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _max_diff(_weights(run), _weights(uninterrupted)) <= 1e-6
    rows, straight = _rows(run), _rows(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, 25))  # every step logged once
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight], abs=1e-6)


_SECOND_SIGNAL = """
import os, signal, sys, time
from predet.engine.preemption import StopSignals
with StopSignals() as s:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # a copy (torchrun forwarding what Slurm sent): ignored
    time.sleep(0.2)
    print(s.name, flush=True)
    if sys.argv[1] == "twice":
        time.sleep(1.2)
        os.kill(os.getpid(), signal.SIGTERM)  # a second request: the process ends by it, now
        time.sleep(5)
        print("still here")
"""


@pytest.mark.parametrize("how", ["once", "twice"])
def test_a_second_signal_stops_at_once_a_copy_does_not(how):
    proc = subprocess.run([sys.executable, "-c", _SECOND_SIGNAL, how], env=ENV, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.stdout.splitlines() == ["SIGTERM"]
    assert proc.returncode == (0 if how == "once" else -signal.SIGTERM)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint(uninterrupted, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "150m"):
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk test needs a small real file system")
    try:
        run = disk / "run"
        # a tiny_cpu checkpoint is 93 MB (weights + momentum): step 4's fits, step 8's does not
        cmd = [*_pretrain_cmd(run), "ckpt.every=4"]
        proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [x for x in proc.stderr.splitlines() if x.startswith("predet:")]
        assert len(lines) == 1 and lines[0].startswith("predet: error: no space left on the device of "), lines
        assert "step_000008.pt" in lines[0] and "MB are free" in lines[0]
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names == ["last.pt", "step_000004.pt"]  # nothing partial
        assert load_checkpoint(checkpoint_path(run))["step"] == 4
        # space comes back (the run moves to a larger disk): the same command finishes
        bigger = tmp_path / "bigger"
        subprocess.run(["cp", "-a", str(run), str(bigger)], check=True)
        proc = subprocess.run([*_pretrain_cmd(bigger), "ckpt.every=4", "ckpt.keep_last=1"], env=ENV, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _max_diff(_weights(bigger), _weights(uninterrupted)) <= 1e-6
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# --------------------------------------------------------------------------------------------
# torchrun: a killed worker, the group restarted, the run resumed by itself
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--max-restarts=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "predet", "pretrain",
            "--config", TINY, "--out", str(run), "--resume", "auto", *RUN, "data.num_workers=0",
            "train.dist_timeout_s=60", *extra]  # fmt: skip


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes(builtin_cache, tmp_path):
    straight = tmp_path / "straight"
    proc = subprocess.run(_torchrun(straight), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(run, "ckpt.every=4"), env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    t0 = time.time()
    while not (run / "checkpoints" / "step_000008.pt").is_file():
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "steps 0->24 of 24" in out and re.search(r"steps (8|12|16|20)->24 of 24", out), out[-2000:]
    assert math.isclose(_max_diff(_weights(run), _weights(straight)), 0.0, abs_tol=1e-6)
    assert [r["step"] for r in _rows(run)] == list(range(1, 25))
