"""``examples/slurm/pretrain.sbatch`` under a real one-node Slurm on localhost (issue 25).

The job is told its time limit is near (``scancel --batch --signal=USR1``, what
``--signal=B:USR1@180`` sends), requeues itself, predet saves at the step reached, and the requeued
job resumes with the same command and finishes with the weights of an uninterrupted 2-rank run.
Skipped, with the reason, where Slurm cannot start (not installed, not root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from predet.utils import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/pretrain/tiny_cpu.yaml"
ARGS = ["train.steps=24", "train.batch_size=2", "train.warmup_steps=1", "train.log_every=1", "ckpt.every=4",
        "data.num_workers=0"]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture
def slurm(tmp_path):
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a localhost Slurm cluster runs its daemons as root")
    folder = tmp_path / "slurm"
    script = ROOT / "examples" / "slurm" / "localhost_cluster.sh"
    env = {**os.environ, "SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    proc = subprocess.run(["bash", str(script), "start", str(folder)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        pytest.skip(f"a one-node Slurm did not start here: {proc.stderr.strip()[-300:]}")
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    yield env
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    t0 = time.time()  # a job's slurmstepd outlives slurmd: let the jobs end before the daemons
    while time.time() - t0 < 60 and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                   text=True).stdout.strip():  # fmt: skip
        time.sleep(1)
    subprocess.run(["bash", str(script), "stop", str(folder)], env=env, capture_output=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm(env: dict, *cmd: str) -> str:
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=True).stdout.strip()


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.5)


def test_a_requeued_slurm_job_resumes_and_finishes_exactly(slurm, tmp_path):
    env = {**slurm, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHON": sys.executable,
           "PREDET_PROCS_PER_NODE": "2", "PREDET_RDZV_PORT": str(_free_port())}  # fmt: skip
    run, log = tmp_path / "run", tmp_path / "job.out"
    job = _slurm(env, "sbatch", "--parsable", f"--chdir={ROOT}", f"--output={log}", "--export=ALL",
                 str(ROOT / "examples" / "slurm" / "pretrain.sbatch"), TINY, str(run), *ARGS)  # fmt: skip
    _wait(lambda: (run / "checkpoints" / "step_000008.pt").is_file(), 300, "the job's step 8")
    # what --signal=B:USR1@180 sends before the time limit: the script requeues the job
    _slurm(env, "scancel", "--batch", "--signal=USR1", job)
    _wait(lambda: "Restarts=1" in _slurm(env, "scontrol", "show", "job", job), 60, "the requeue")
    # a requeued job waits before it is eligible again; start it now (when Slurm lets an update)
    subprocess.run(["scontrol", "update", f"jobid={job}", "BeginTime=now"], env=env, capture_output=True)
    _wait(lambda: not _slurm(env, "squeue", "-h", "-j", job), 600, "the requeued job's end")
    text = log.read_text()
    assert "predet.sbatch: time limit near: requeueing job" in text
    assert "predet: stopped by SIGTERM at step" in text and "steps 0->24 of 24" in text
    assert "predet.sbatch: job %s restart 1" % job in text and "predet.sbatch: exit status 0" in text
    state = _slurm(env, "scontrol", "show", "job", job)
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))  # every step logged once
    # the same 2-rank run without interruption
    straight = tmp_path / "straight"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "predet",
           "pretrain", "--config", TINY, "--out", str(straight), *ARGS]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
