"""``predet pretrain`` through the CLI: bad input exits 2 with one line and deletes nothing."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from predet.cli import main
from predet.data import builtin
from predet.errors import UserError

TINY = "configs/pretrain/tiny_cpu.yaml"
ROOT = Path(__file__).resolve().parents[2]
TOY = ["train.steps=4", "train.batch_size=4", "ckpt.every=2", "data.num_workers=0",
       "train.log_every=1", "data.manifest=toy"]  # fmt: skip


def _pretrain(out: Path, *extra: str) -> int:
    return main(["pretrain", "--config", str(ROOT / TINY), "--out", str(out), *extra])


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predet:")]
    assert len(err) == 1, err
    return err[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_mistyped_key_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(out, "train.stpes=3") == 2
    line = _one_line(capsys)
    assert "unknown config key 'train.stpes'" in line and "train.steps" in line
    assert not out.exists()


def test_existing_run_needs_resume_or_overwrite(toy_engine, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(out, *TOY) == 0
    capsys.readouterr()
    before = _snapshot(out)
    assert _pretrain(out, *TOY) == 2
    assert "exists; pass --resume" in _one_line(capsys)
    assert _snapshot(out) == before
    # --resume of a finished run: nothing left to do, nothing rewritten but config.yaml
    assert _pretrain(out, "--resume", *TOY) == 0
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == {
        k: v for k, v in before.items() if k != "config.yaml"
    }
    # --overwrite starts over
    assert _pretrain(out, "--overwrite", *TOY, "train.steps=2") == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_truncated_checkpoint_exits_2_and_keeps_it(toy_engine, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(out, *TOY, "train.stop_at=2") == 0
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    capsys.readouterr()
    before = _snapshot(out)
    assert _pretrain(out, "--resume", *TOY) == 2
    assert "cannot read checkpoint" in _one_line(capsys)
    assert _snapshot(out) == before


def test_resume_on_other_data_names_the_data_keys_that_changed(toy_engine, tmp_path, capsys, monkeypatch):
    """A --resume that left out the run's data overrides said only "the data changed since"."""
    import os

    from predet.engine import pretrain as pretrain_mod

    out = tmp_path / "run"
    assert _pretrain(out, *TOY, "train.stop_at=2") == 0
    capsys.readouterr()
    before = _snapshot(out)
    toy = pretrain_mod.build_pretrain_data  # toy_engine's stand-in (classes a, b, c)

    def other_data(cfg):
        data = toy(cfg)
        data.classes = ["a", "b", "d"]
        return data

    monkeypatch.setattr(pretrain_mod, "build_pretrain_data", other_data)
    assert _pretrain(out, "--resume", *TOY[:-1], "data.manifest=other") == 2
    line = _one_line(capsys)
    cwd = os.getcwd()  # config.yaml records the manifest's absolute path
    assert line.endswith("last.pt: its 3 classes (a, b, c...) are not the data's 3 (a, b, d...); "
                         f"changed since: data.manifest: '{cwd}/toy' -> '{cwd}/other'"), line
    assert _snapshot(out) == before


def test_resume_without_a_run_exits_2(toy_engine, tmp_path, capsys):
    assert _pretrain(tmp_path / "nope", "--resume", *TOY) == 2
    assert "does not exist" in _one_line(capsys)
    assert not (tmp_path / "nope").exists()


def test_bad_numbers_exit_2(toy_engine, tmp_path, capsys):
    assert _pretrain(tmp_path / "a", *TOY, "train.stop_at=9") == 2
    assert "train.stop_at=9" in _one_line(capsys)
    assert _pretrain(tmp_path / "b", *TOY, "train.batch_size=40") == 2  # 24 toy images
    assert "fewer than train.batch_size (40)" in _one_line(capsys)
    assert not (tmp_path / "a").exists()
    # --overwrite of a finished run with a batch the data cannot fill: the run is kept (it was
    # emptied before the data stream found out)
    assert _pretrain(tmp_path / "c", *TOY) == 0
    capsys.readouterr()
    before = _snapshot(tmp_path / "c")
    assert _pretrain(tmp_path / "c", "--overwrite", *TOY, "train.batch_size=40") == 2
    assert "fewer than train.batch_size (40)" in _one_line(capsys)
    assert _snapshot(tmp_path / "c") == before


def test_every_loss_off_exits_2_before_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    off = ["loss.cls=false", "loss.crpn=false", "loss.info=false", "loss.croi_reg=false"]
    assert _pretrain(out, *TOY, *off) == 2
    assert "every loss is switched off" in _one_line(capsys)
    assert not out.exists()


def test_find_unused_parameters_only_when_a_loss_is_off(monkeypatch):
    """DDP searches for unused parameters (a cost every step) only when a part has no loss."""
    import torch

    from predet.config import PretrainConfig, load_config
    from predet.engine.pretrain import _find_unused
    from predet.engine.trainer import check_syncbn, wrap_ddp
    from predet.errors import UserError

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        got = {}
        for over in ([], ["loss.info=false"], ["train.find_unused_parameters=true"]):
            cfg = load_config(PretrainConfig, None, over)
            ddp = wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu"), find_unused=_find_unused(cfg))
            got[tuple(over)] = ddp.find_unused_parameters
        # under torchrun, SyncBN off CUDA is refused by the launch check (before any folder)
        sync = torch.nn.Sequential(torch.nn.SyncBatchNorm(2))
        with pytest.raises(UserError, match="model.norm=syncbn needs CUDA under torchrun"):
            check_syncbn(sync, torch.device("cpu"))
        check_syncbn(torch.nn.BatchNorm2d(2), torch.device("cpu"))
    finally:
        torch.distributed.destroy_process_group()
    check_syncbn(sync, torch.device("cpu"))  # one process: SyncBatchNorm acts as BatchNorm
    assert got == {(): False, ("loss.info=false",): True, ("train.find_unused_parameters=true",): True}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# builtin:<preset>
# --------------------------------------------------------------------------------------------
def test_parse_builtin():
    assert builtin.parse_builtin("builtin:tiny") == ("tiny", 0)
    assert builtin.parse_builtin("builtin:small:3") == ("small", 3)
    for bad in ("builtin:huge", "builtin:tiny:x", "builtin:"):
        with pytest.raises(UserError, match="builtin"):
            builtin.parse_builtin(bad)


def _fake_generate(world, *, progress):
    with open(world.root.parent / "generations.log", "a") as f:
        f.write(f"{world.root.name}\n")
    world.root.mkdir(parents=True)
    time.sleep(0.5)  # long enough for the other process to reach the lock
    (world.root / builtin.MARKER).write_text("{}")


def _ensure(root: str) -> None:
    # patched by hand (inherited by forked children), and restored: the test process goes on to
    # generate real worlds in later tests
    original, builtin._generate = builtin._generate, _fake_generate
    try:
        builtin.ensure_world("tiny", 0, root=Path(root), progress=False)
    finally:
        builtin._generate = original


def test_concurrent_ensure_world_generates_once(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "generations.log").read_text() == "tiny-seed0\n"
    _ensure(str(tmp_path))  # complete: reused
    assert (tmp_path / "generations.log").read_text() == "tiny-seed0\n"
    # an interrupted generation (no marker) is redone, and so is a world made by other code
    (tmp_path / "tiny-seed0" / builtin.MARKER).unlink()
    _ensure(str(tmp_path))
    assert (tmp_path / "generations.log").read_text() == "tiny-seed0\n" * 2
    (tmp_path / "tiny-seed0" / builtin.MARKER).write_text('{"fingerprint": "older"}')
    _ensure(str(tmp_path))
    assert (tmp_path / "generations.log").read_text() == "tiny-seed0\n" * 3
