"""The pre-training loop on stand-in model/data: schedule, exact resume, NaN stop, logging."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from predet.config import PretrainConfig, load_config
from predet.data.stream import BatchStream, EpochBatchSampler, StreamPosition
from predet.engine.common import (
    NonFiniteLossError,
    WarmupCosineSchedule,
    WarmupStepSchedule,
    build_lr_scheduler,
    get_rng_state,
    scaled_lr,
    set_rng_state,
    uniform_milestones,
)
from predet.engine.pretrain import pretrain
from predet.errors import UserError
from predet.utils import load_checkpoint


def _cfg(*overrides: str):
    base = [
        "train.steps=8",
        "train.batch_size=4",
        "train.lr=0.05",
        "train.warmup_steps=2",
        "train.log_every=1",
        "ckpt.every=4",
        "data.num_workers=0",
        "data.manifest=toy",
    ]
    return load_config(PretrainConfig, None, [*base, *overrides])


def test_paper_schedule_numbers():
    assert uniform_milestones(540_000, 4) == [108_000, 216_000, 324_000, 432_000]
    assert scaled_lr(0.2, 1024, 1024) == pytest.approx(0.2)
    assert scaled_lr(0.2, 1024, 16) == pytest.approx(0.003125)
    s = WarmupStepSchedule(warmup_steps=10, milestones=[20, 40], warmup_factor=0.001)
    assert s(0) == pytest.approx(0.001)
    assert s(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [s(10), s(19), s(20), s(39), s(40), s(1000)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_scheduler_state_roundtrip_weights_only():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = build_lr_scheduler(opt, warmup_steps=3, milestones=[5])
    for _ in range(4):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = torch.optim.SGD([p], lr=0.2)
    sched2 = build_lr_scheduler(opt2, warmup_steps=99, milestones=[])
    sched2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):  # steps 4, 5, 6: the milestone at 5 must survive the round trip
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.02)


def test_rng_state_roundtrip_weights_only():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    buf = io.BytesIO()
    torch.save(get_rng_state(), buf)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_epoch_batch_sampler_splits_ranks_and_resumes():
    kw = dict(num_items=23, batch_size=3, seed=5, world_size=2)
    streams = [iter(EpochBatchSampler(rank=r, **kw)) for r in range(2)]
    epoch0 = [[next(s) for _ in range(3)] for s in streams]  # 23 // 2 // 3 = 3 steps per epoch
    items = [i for rank in epoch0 for b in rank for (e, i) in b]
    assert len(items) == 18 and len(set(items)) == 18  # disjoint across ranks, no repeats
    assert {e for rank in epoch0 for b in rank for (e, _) in b} == {0}
    assert {e for (e, _) in next(streams[0])} == {1}  # then epoch 1
    resumed = iter(EpochBatchSampler(rank=1, start=StreamPosition(0, 2), **kw))
    assert next(resumed) == epoch0[1][2]
    assert {e for (e, _) in next(resumed)} == {1}


def test_batch_stream_position_tracks_epochs(toy_data):
    data = toy_data()  # 24 items
    stream = BatchStream(data.dataset, collate_fn=data.collate_fn, batch_size=5, seed=0)
    it = iter(stream)
    for _ in range(4):  # 4 steps per epoch
        next(it)
    assert stream.position == StreamPosition(1, 0)
    next(it)
    assert stream.position == StreamPosition(1, 1)


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(toy_data, toy_model, tmp_path, workers):
    """8 steps straight == 3 steps, stop, --resume to 8 (dropout + BN + momentum + lr decay)."""
    cfg = _cfg(f"data.num_workers={workers}")
    straight = pretrain(cfg, tmp_path / "straight", data=toy_data(), model=toy_model())
    split = tmp_path / "split"
    pretrain(_cfg(f"data.num_workers={workers}", "train.stop_at=3"), split, data=toy_data(), model=toy_model())
    assert _weights(split)["step"] == 3
    assert _weights(split)["data_position"]["batch"] == 3  # 24 // 4 = 6 batches per epoch
    pretrain(cfg, split, resume=True, data=toy_data(), model=toy_model())
    a, b = _weights(straight), _weights(split)
    assert a["step"] == b["step"] == 8
    assert a["data_position"] == b["data_position"] == {
        "epoch": 1, "batch": 2, "batch_size": 4, "world_size": 1
    }
    diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
    assert diff <= 1e-6
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))
    # the resumed run's metrics.jsonl has each step once, and the same values as the straight run
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    assert [r["loss"] for r in rows_b] == pytest.approx([r["loss"] for r in rows_a], abs=1e-6)


def test_metrics_checkpoints_and_schedule(toy_data, toy_model, tmp_path):
    cfg = _cfg("train.log_every=2", "train.warmup_factor=0.5")
    run = pretrain(cfg, tmp_path / "run", data=toy_data(), model=toy_model())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for key in ("lr", "loss", "loss_cls", "loss_info", "lookup_top1", "valid_queries",
                "images_per_s", "world_size"):
        assert key in rows[0], key
    assert rows[0]["world_size"] == 1 and rows[0]["valid_queries"] == 4.0
    assert rows[0]["loss"] == pytest.approx(rows[0]["loss_cls"] + rows[0]["loss_info"], rel=1e-5)
    # lr of the step logged: 8 steps, milestones [2, 3, 5, 6] (rounded 8k/5), warm-up over 2 steps
    sched = WarmupStepSchedule(warmup_steps=2, milestones=uniform_milestones(8, 4), warmup_factor=0.5)
    assert [r["lr"] for r in rows] == pytest.approx([0.05 * sched(s - 1) for s in (2, 4, 6, 8)])
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.pt", "step_000004.pt", "step_000008.pt"]
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())
    ckpt = load_checkpoint(run / "checkpoints" / "step_000004.pt")
    assert ckpt["step"] == 4 and ckpt["classes"] == ["a", "b", "c"] and len(ckpt["rng"]) == 1


def test_explicit_lr_steps_replace_the_uniform_decays(toy_data, toy_model, tmp_path):
    cfg = _cfg("train.warmup_steps=0", "train.lr_steps=[6]")  # decay_steps (4) is ignored
    run = pretrain(cfg, tmp_path / "run", data=toy_data(), model=toy_model())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # step s (1-based) runs at scheduler index s - 1: x0.1 from the 7th step on
    assert [r["lr"] for r in rows] == pytest.approx([0.05] * 6 + [0.005] * 2)


@pytest.mark.parametrize("steps", ["[5,3]", "[3,3]", "[0]", "[8]", "[9]"])
def test_bad_lr_steps_are_user_errors(steps):
    # a drop after the last step (8 of 8) would never act: an error, not a silent no-op
    with pytest.raises(UserError, match=r"train.lr_steps=.*strictly increasing steps in \[1, 7\] \(train.steps=8\)"):
        _cfg(f"train.lr_steps={steps}")


def test_empty_lr_steps_means_a_constant_lr(toy_data, toy_model, tmp_path):
    run = pretrain(_cfg("train.warmup_steps=0", "train.lr_steps=[]"), tmp_path / "run", data=toy_data(), model=toy_model())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.05] * 8)  # decay_steps=4 is not used


def test_resume_follows_the_edited_lr_steps(toy_data, toy_model, tmp_path):
    """On --resume the step count comes from the checkpoint, the schedule from the config."""
    run = tmp_path / "run"
    pretrain(_cfg("train.warmup_steps=0", "train.lr_steps=[6]", "train.stop_at=3"), run, data=toy_data(), model=toy_model())
    pretrain(_cfg("train.warmup_steps=0", "train.lr_steps=[4]"), run, resume=True, data=toy_data(), model=toy_model())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["lr"] for r in rows] == pytest.approx([0.05] * 4 + [0.005] * 4)


def test_cosine_schedule_numbers():
    s = WarmupCosineSchedule(warmup_steps=10, total_steps=110, warmup_factor=0.001)
    assert s(0) == pytest.approx(0.001)
    assert s(5) == pytest.approx(0.001 * 0.5 + 0.5)
    # 0.5 (1 + cos(pi t)), t = (s - 10) / 100
    assert [s(10), s(35), s(60), s(85), s(110), s(500)] == pytest.approx(
        [1.0, 0.5 * (1 + 2**-0.5), 0.5, 0.5 * (1 - 2**-0.5), 0.0, 0.0]
    )
    with pytest.raises(ValueError, match="total_steps 10 must exceed warmup_steps 10"):
        WarmupCosineSchedule(warmup_steps=10, total_steps=10)


def test_cosine_lr_schedule_in_a_run(toy_data, toy_model, tmp_path, capsys):
    run = pretrain(_cfg("train.warmup_steps=0", "train.lr_schedule=cosine"), tmp_path / "run", data=toy_data(), model=toy_model())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # step s (1-based) runs at scheduler index s - 1 of 8: 0.05 * 0.5 (1 + cos(pi (s - 1) / 8))
    expected = [0.05 * 0.5 * (1 + np.cos(np.pi * i / 8)) for i in range(8)]
    assert [r["lr"] for r in rows] == pytest.approx(expected)
    assert "lr 0.05 (cosine to 0 at 8)" in capsys.readouterr().out


def test_resume_of_a_cosine_run_matches_the_unbroken_run(toy_data, toy_model, tmp_path):
    whole = pretrain(_cfg("train.lr_schedule=cosine"), tmp_path / "whole", data=toy_data(), model=toy_model())
    split = tmp_path / "split"
    pretrain(_cfg("train.lr_schedule=cosine", "train.stop_at=4"), split, data=toy_data(), model=toy_model())
    pretrain(_cfg("train.lr_schedule=cosine"), split, resume=True, data=toy_data(), model=toy_model())
    lrs = [[json.loads(x)["lr"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (whole, split)]
    assert lrs[1] == pytest.approx(lrs[0]) and len(lrs[0]) == 8


def test_resume_switches_from_steps_to_the_cosine_of_the_edited_config(toy_data, toy_model, tmp_path):
    run = tmp_path / "run"
    pretrain(_cfg("train.warmup_steps=0", "train.lr_steps=[2]", "train.stop_at=4"), run, data=toy_data(), model=toy_model())
    pretrain(_cfg("train.warmup_steps=0", "train.lr_schedule=cosine"), run, resume=True, data=toy_data(), model=toy_model())
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    cosine = [0.05 * 0.5 * (1 + np.cos(np.pi * i / 8)) for i in range(8)]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005, *cosine[4:]])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lr_schedule=linear"], "train.lr_schedule"),
        (["train.lr_schedule=cosine", "train.lr_steps=[4]"], r"train.lr_steps=\[4\] with train.lr_schedule=cosine"),
        (["train.lr_schedule=cosine", "train.warmup_steps=8"], "train.warmup_steps=8 with train.lr_schedule=cosine"),
    ],
)
def test_bad_cosine_settings_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        _cfg(*overrides)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy_data, toy_model, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(_cfg(), run, data=toy_data(), model=toy_model(nan_at_call=6))
    assert "step 6: loss_info=nan" in str(err.value)
    assert str(run / "checkpoints" / "last.pt") in str(err.value)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["step"] == 4  # the good one; nothing written after the NaN
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_000004.pt"]


def test_a_nan_step_never_reaches_the_weights(toy_data, toy_model, tmp_path):
    """The finite check reads the step after its backward but before the update: the model in
    memory keeps the weights of the last finite step."""
    model = toy_model(nan_at_call=6)
    with pytest.raises(NonFiniteLossError, match="step 6: loss_info=nan"):
        pretrain(_cfg("train.clip_grad=1.0"), tmp_path / "run", data=toy_data(), model=model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("clip", ["null", "1.0"])
def test_a_nan_gradient_of_a_finite_loss_stops_before_the_update(toy_data, toy_model, tmp_path, clip):
    """Finite losses, a NaN gradient: the run stops at that step (it wrote NaN into the weights
    and then into the next checkpoint, named the last good one)."""
    model = toy_model(nan_grad_at_call=6)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient at step 6: grad_norm=nan \(last good checkpoint: "):
        pretrain(_cfg(f"train.clip_grad={clip}"), run, data=toy_data(), model=model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["step"] == 4 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_keep_last_orders_checkpoints_by_step_number(tmp_path):
    from predet.engine.common import save_training_checkpoint

    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        save_training_checkpoint({"step": step, "model": {}}, tmp_path, periodic=True, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == [
        "step_1000000.pt", "step_1000001.pt"]  # as text, step_1000000 sorted before step_999999


def test_a_resumed_run_logs_the_rows_of_the_unbroken_run(toy_data, toy_model, tmp_path):
    """Killed after the checkpoint of step 3 with a row every 2 steps: the resumed run's row of
    step 4 averages steps 3 and 4, as the unbroken run's does (it held step 4 alone: step 3's
    values were lost from the log)."""
    cfg = _cfg("train.log_every=2", "ckpt.every=3")
    straight = pretrain(cfg, tmp_path / "straight", data=toy_data(), model=toy_model())
    split = tmp_path / "split"
    with pytest.raises(NonFiniteLossError):  # the run dies in step 4, after step 3's checkpoint
        pretrain(cfg, split, data=toy_data(), model=toy_model(nan_at_call=4))
    pretrain(cfg, split, resume=True, data=toy_data(), model=toy_model())
    keys = ("step", "loss", "loss_cls", "loss_info", "lookup_top1", "lr", "grad_norm")
    rows = {r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (straight, split)}
    assert [r["step"] for r in rows[split]] == [2, 4, 6, 8]
    for ra, rb in zip(rows[straight], rows[split], strict=True):
        assert {k: rb[k] for k in keys} == pytest.approx({k: ra[k] for k in keys}, rel=1e-5), ra["step"]


def test_one_device_read_per_step(toy_data, toy_model, tmp_path, monkeypatch):
    """The loop reads device values once a step (losses, metrics and grad_norm in one tensor;
    under DDP the finiteness flag too): no other ``.item()`` / ``.tolist()`` / ``float()`` of a
    tensor from the loop in the step (issue 11). A float16 GradScaler adds its own read."""
    import sys

    reads = []
    for name in ("tolist", "item", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads.append(sys._getframe(1).f_code.co_filename)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = _cfg("train.clip_grad=1.0", "train.log_every=4")
    run = pretrain(cfg, tmp_path / "run", data=toy_data(), model=toy_model())
    monkeypatch.undo()
    assert sum(f.endswith(("loop.py", "clip_grad.py")) for f in reads) == 8  # 8 steps
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows)  # still logged, from the same read


def test_a_new_loss_is_logged_summed_and_checked_without_engine_edits(toy_data, toy_model, tmp_path):
    """The loop logs and NaN-checks whatever loss_* the model returns: no list to edit."""
    run = pretrain(_cfg(), tmp_path / "run", data=toy_data(), model=toy_model(extra_loss="loss_dummy"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_dummy"] > 0 for r in rows)
    for r in rows:  # the total is the sum of the terms, the new one included
        assert r["loss"] == pytest.approx(r["loss_cls"] + r["loss_info"] + r["loss_dummy"], rel=1e-5)
    with pytest.raises(NonFiniteLossError, match="step 3: loss_dummy=nan"):
        pretrain(_cfg(), tmp_path / "nan", data=toy_data(), model=toy_model(nan_at_call=3, extra_loss="loss_dummy"))


def test_run_config_records_resolved_lr(toy_data, toy_model, tmp_path):
    """config.yaml holds the lr the run trained at (train.lr unset: 0.2 x 4 / 1024)."""
    cfg = _cfg("train.lr=null", "train.steps=2", "train.warmup_steps=0", "train.decay_steps=0")
    run = pretrain(cfg, tmp_path / "run", data=toy_data(), model=toy_model())
    saved = load_config(PretrainConfig, run / "config.yaml")
    assert saved.train.lr == pytest.approx(0.2 * 4 / 1024) and cfg.train.lr is None
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([saved.train.lr] * 2)  # no warm-up, no decay


def _collate_with_skips(samples: list) -> dict:
    """The stand-ins' collate, saying (as ``collate_two_view`` does) that the loader replaced one
    unreadable image of each batch."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("view1", "view2", "labels")}
    return {**batch, "num_skipped": torch.tensor(1)}


def test_skipped_images_are_counted_and_reported(toy_data, toy_model, tmp_path, capsys):
    data = toy_data()
    data.collate_fn = _collate_with_skips
    pretrain(_cfg("train.steps=3"), tmp_path / "run", data=data, model=toy_model())
    assert "predet pretrain: 3 unreadable images skipped" in capsys.readouterr().out


class _Counting(torch.utils.data.IterableDataset):
    """One pass yields ``epoch * 100 + i`` for i < 7."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter([self.epoch * 100 + i for i in range(7)])


def test_iterable_stream_epochs_and_resume():
    collate = lambda xs: list(xs)  # noqa: E731
    stream = BatchStream(_Counting(), collate_fn=collate, batch_size=3, seed=0)
    it = iter(stream)
    assert [next(it) for _ in range(3)] == [[0, 1, 2], [3, 4, 5], [100, 101, 102]]  # tail dropped
    assert stream.position == StreamPosition(1, 1)
    # resuming mid-epoch starts the next epoch's stream, never replaying consumed samples
    resumed = BatchStream(_Counting(), collate_fn=collate, batch_size=3, seed=0, start=stream.position)
    assert next(iter(resumed)) == [200, 201, 202]
    assert resumed.position == StreamPosition(2, 1)


def test_grad_norm_is_logged_before_clipping(toy_data, toy_model, tmp_path):
    """With train.clip_grad set, each row logs the gradient norm before clipping (so a run can
    tell how much the clip scales its steps down); a clip above every norm changes nothing."""

    def rows(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    plain = pretrain(_cfg(), tmp_path / "plain", data=toy_data(), model=toy_model())
    loose = pretrain(_cfg("train.clip_grad=1e9"), tmp_path / "loose", data=toy_data(), model=toy_model())
    tight = pretrain(_cfg("train.clip_grad=1e-3"), tmp_path / "tight", data=toy_data(), model=toy_model())
    norms = [r["grad_norm"] for r in rows(loose)]
    assert [r["grad_norm"] for r in rows(plain)] == pytest.approx(norms, rel=1e-6)  # logged unclipped too
    assert all(n > 1e-3 for n in norms)
    # step 1 starts from the same weights in both runs: the same pre-clip norm
    assert rows(tight)[0]["grad_norm"] == pytest.approx(norms[0], rel=1e-6)
    w = {name: load_checkpoint(r / "checkpoints" / "last.pt")["model"] for name, r in
         (("plain", plain), ("loose", loose), ("tight", tight))}  # fmt: skip
    for k, v in w["plain"].items():
        torch.testing.assert_close(w["loose"][k], v, rtol=0, atol=0)
    assert any(not torch.equal(w["tight"][k], v) for k, v in w["plain"].items() if v.is_floating_point())


def test_periodic_checkpoint_is_stored_once_and_survives_later_saves(tmp_path):
    """``last.pt`` written with a periodic ``step_<n>.pt`` is the same file (a hard link where the
    filesystem has them): the bytes are stored once; the next save of ``last.pt`` (temp + rename)
    leaves ``step_<n>.pt`` as it was."""
    import os

    from predet.engine.common import save_training_checkpoint

    state = lambda step: {"step": step, "model": {"w": torch.full((1000,), float(step))}}  # noqa: E731
    last = save_training_checkpoint(state(4), tmp_path, periodic=True)
    step4 = tmp_path / "checkpoints" / "step_000004.pt"
    assert last.read_bytes() == step4.read_bytes()
    if os.stat(step4).st_nlink == 2:  # linked, not copied
        assert os.path.samefile(last, step4)
    save_training_checkpoint(state(5), tmp_path, periodic=False)
    assert load_checkpoint(step4)["step"] == 4 and load_checkpoint(last)["step"] == 5
    assert torch.equal(load_checkpoint(step4)["model"]["w"], torch.full((1000,), 4.0))
    assert os.stat(step4).st_nlink == 1  # last.pt now names another file
    save_training_checkpoint(state(8), tmp_path, periodic=True, keep_last=1)  # deletes step 4
    assert not step4.exists() and load_checkpoint(last)["step"] == 8
