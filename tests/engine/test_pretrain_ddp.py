"""DDP (gloo, 2 processes on CPU) with the stand-ins: identical ranks, exact resume, world_size."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
from pathlib import Path

import pytest
import torch

from predet.config import PretrainConfig, load_config
from predet.utils import load_checkpoint

ARGS = ["train.steps=6", "train.batch_size=3", "train.lr=0.05", "train.warmup_steps=2",
        "train.log_every=1", "ckpt.every=3", "data.num_workers=0", "data.manifest=toy"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, extra: list, resume: bool, stubs) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from predet.engine.pretrain import pretrain

    cfg = load_config(PretrainConfig, None, [*ARGS, *extra])
    pretrain(cfg, Path(out), resume=resume, data=stubs["data"](), model=stubs["model"]())


def _launch(out: Path, stubs: dict, *extra: str, resume: bool = False) -> None:
    ctx = mp.get_context("fork")  # the children inherit the stand-ins defined in conftest
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out), list(extra), resume, stubs))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]


@pytest.mark.slow
def test_ddp_two_ranks_identical_and_resume_exact(toy_data, toy_model, tmp_path):
    stubs = {"data": toy_data, "model": toy_model}
    straight = tmp_path / "straight"
    _launch(straight, stubs)
    ranks = json.loads((straight / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and len(set(ranks["param_sha1"])) == 1
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {r["world_size"] for r in rows} == {2}
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert len(a["rng"]) == 2 and a["data_position"]["world_size"] == 2
    # 24 items / 2 ranks / 3 per batch = 4 steps per epoch: step 6 is epoch 1, batch 2
    assert (a["data_position"]["epoch"], a["data_position"]["batch"]) == (1, 2)

    split = tmp_path / "split"
    _launch(split, stubs, "train.stop_at=4")
    _launch(split, stubs, resume=True)
    b = load_checkpoint(split / "checkpoints" / "last.pt")
    diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
    assert b["step"] == 6 and diff <= 1e-6


def _nan_worker(rank: int, port: int, out: str, stubs) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from predet.engine.common import NonFiniteLossError
    from predet.engine.pretrain import pretrain

    cfg = load_config(PretrainConfig, None, [*ARGS, "train.clip_grad=1.0"])
    model = stubs["model"](nan_at_call=4 if rank == 1 else 0)  # only rank 1 goes wrong
    try:
        pretrain(cfg, Path(out), data=stubs["data"](), model=model)
    except NonFiniteLossError as err:
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        Path(out, f"rank{rank}.txt").write_text(f"{finite} {err}")


@pytest.mark.slow
def test_ddp_a_nan_on_one_rank_stops_every_rank_before_the_update(toy_data, toy_model, tmp_path):
    """The finiteness flag is reduced on the device with the step's values: both ranks raise at
    the same step, naming rank 1's term, and neither rank's weights take the NaN update."""
    out, port = tmp_path / "run", _free_port()
    ctx = mp.get_context("fork")
    stubs = {"data": toy_data, "model": toy_model}
    procs = [ctx.Process(target=_nan_worker, args=(r, port, str(out), stubs)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]  # each caught its NonFiniteLossError
    for rank in range(2):
        text = (out / f"rank{rank}.txt").read_text()
        assert text.startswith("True non-finite loss at step 4: loss_info=nan"), text
