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


class _Recording(torch.utils.data.Dataset):
    """The stand-in dataset, noting each (epoch, item) this rank reads."""

    def __init__(self, inner) -> None:
        self.inner, self.epoch, self.read = inner, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        self.read.append((self.epoch, int(i)))
        return self.inner[i]


def _worker(rank: int, port: int, out: str, extra: list, resume: bool, stubs) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from predet.engine.pretrain import pretrain

    cfg = load_config(PretrainConfig, None, [*ARGS, *extra])
    data = stubs["data"]()
    data.dataset = _Recording(data.dataset)
    pretrain(cfg, Path(out), resume=resume, data=data, model=stubs["model"]())
    if not resume:
        Path(out, f"read{rank}.json").write_text(json.dumps(data.dataset.read))


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
    # each rank reads its own half of every epoch: epoch 0 is split into two disjoint halves
    read = [json.loads((straight / f"read{r}.json").read_text()) for r in range(2)]
    epoch0 = [{i for e, i in rows if e == 0} for rows in read]
    assert len(epoch0[0]) == len(epoch0[1]) == 12 and not epoch0[0] & epoch0[1]
    assert epoch0[0] | epoch0[1] == set(range(24))
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
        # every rank names the checkpoint of step 3 (rank 1 said "no checkpoint written yet")
        assert text.endswith(f"(last good checkpoint: {out / 'checkpoints' / 'last.pt'})"), text


class _QueryParity(torch.utils.data.Dataset):
    """Two-view items for the real PreDet model: even items hold two query boxes, odd ones none
    (an image whose unsupervised boxes were all filtered out, which the design allows)."""

    size, queries, classes = 32, 4, 3

    def __init__(self, n: int = 12) -> None:
        self.n = n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        view = torch.randn(3, self.size, self.size, generator=g)
        boxes = torch.zeros(self.queries, 4)
        mask = torch.zeros(self.queries, dtype=torch.bool)
        if i % 2 == 0:
            boxes[:2] = torch.tensor([[2.0, 2.0, 20.0, 18.0], [10.0, 8.0, 30.0, 30.0]])
            mask[:2] = True
        labels = torch.zeros(self.classes)
        labels[i % self.classes] = 1.0
        return {"view1": view, "view2": view.flip(-1), "boxes1": boxes, "boxes2": boxes.clone(),
                "query_mask": mask, "labels": labels}  # fmt: skip


def _parity_collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _parity_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from types import SimpleNamespace

    from predet.engine.pretrain import pretrain
    from predet.modeling.predet import build_predet

    cfg = load_config(PretrainConfig, None, [
        "model.backbone=resnet18", "model.fpn_channels=16", "model.box_head_dim=32",
        "model.input_size=32", "model.crpn.anchor_sizes=[4,8,16,32,64]", "model.crpn.dim=8",
        "model.crpn.batch_per_view=16", "model.crpn.pre_nms_top_n=8", "model.crpn.post_nms_top_n=8",
        "model.croi.embed_dim=16", "model.croi.reg_dim=8", "model.croi.num_negatives=16",
        "train.steps=4", "train.batch_size=1", "train.lr=0.01", "train.warmup_steps=1",
        "train.log_every=1", "ckpt.every=4", "data.num_workers=0", "data.manifest=parity",
    ])  # fmt: skip
    torch.manual_seed(0)
    data = SimpleNamespace(dataset=_QueryParity(), classes=["a", "b", "c"], collate_fn=_parity_collate)
    pretrain(cfg, Path(out), data=data, model=build_predet(cfg, 3))


@pytest.mark.slow
def test_ddp_a_rank_whose_batch_has_no_query_still_steps_with_the_others(tmp_path):
    """Batch of 1 per rank, items alternating with / without queries: some steps give one rank
    a query-less batch. Its detection heads still run (losses exactly 0), so both ranks' DDP
    reductions match: the run ends with identical ranks (before: gloo aborted with a collective
    mismatch; NCCL hangs)."""
    out, port = tmp_path / "run", _free_port()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_parity_worker, args=(r, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and len(set(ranks["param_sha1"])) == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the logged values are the two ranks' mean: 1.0 is a step where one rank had no query
    assert 1.0 in {r["valid_queries"] for r in rows} <= {0.0, 1.0, 2.0}
    for r in rows:  # neither rank had a query: the detection losses are exactly 0
        if r["valid_queries"] == 0.0:
            assert r["loss_info"] == 0.0 and r["loss_crpn_cls"] == 0.0
