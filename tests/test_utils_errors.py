"""``prepare_run_dir`` and ``load_checkpoint``: the wrong kind of path or file is one clear line."""

import pickle
import warnings

import numpy as np
import pytest
import torch

from predet.errors import UserError
from predet.utils import load_checkpoint, prepare_run_dir, save_checkpoint


def test_run_dir_that_is_a_file_is_refused_and_kept(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    for flags in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(UserError) as e:
            prepare_run_dir(afile, **flags)
        assert str(e.value) == f"run folder {afile} is a file, not a folder; choose another --out"
    assert afile.read_text() == "keep me\n"


def test_resume_of_an_empty_folder_says_it_holds_no_run(tmp_path):
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        prepare_run_dir(empty, resume=True)
    assert str(e.value) == (
        f"--resume given but run folder {empty} is empty: it holds no run (no checkpoint) to resume; "
        "drop --resume to start one there"
    )
    assert "does not exist" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        prepare_run_dir(tmp_path / "nope", resume=True)
    assert prepare_run_dir(empty) == empty  # without --resume an empty folder is used as is


def test_detectron2_pickle_is_not_a_checkpoint(tmp_path, recwarn):
    for name in ("model_final.pkl", "weights.pth"):  # by content, whatever the extension
        path = tmp_path / name
        with path.open("wb") as f:
            pickle.dump({"model": {"res2.0.conv1.weight": np.zeros((2, 2))}, "__author__": "d2"}, f, protocol=4)
        with pytest.raises(UserError) as e:
            load_checkpoint(path)
        assert str(e.value) == (
            f"{path}: not a PyTorch checkpoint (a plain pickle, e.g. a detectron2 .pkl, not a torch.save file)"
        )
    assert len(recwarn) == 0  # no torch.load warning dump


@pytest.mark.parametrize(
    "name, data, kind",
    [
        ("config.yaml", b"model:\n  backbone: resnet50\n", "a text file"),
        ("empty.pt", b"", "an empty file"),
        ("noise.pt", bytes(range(256)), "neither a torch.save zip nor a legacy torch file"),
    ],
    ids=["yaml", "empty", "binary"],
)
def test_foreign_file_is_not_a_checkpoint(tmp_path, name, data, kind):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"{path}: not a PyTorch checkpoint ({kind})"


@pytest.mark.parametrize("legacy", [False, True])
def test_real_checkpoints_still_load(tmp_path, recwarn, legacy):
    path = tmp_path / "last.pt"
    obj = {"model": {"w": torch.arange(3.0)}, "step": 7}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    got = load_checkpoint(path)
    assert got["step"] == 7 and torch.equal(got["model"]["w"], torch.tensor([0.0, 1.0, 2.0]))
    assert len(recwarn) == 0
    save_checkpoint(obj, tmp_path / "atomic.pt")
    assert load_checkpoint(tmp_path / "atomic.pt")["step"] == 7


def test_unreadable_torch_files_are_one_line(tmp_path):
    """weights_only=True stays: a torch.save file pickling an arbitrary class does not load."""
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "obj": pickle.PickleError("x")}, path)
    with pytest.raises(UserError, match=r"^cannot read checkpoint .*evil\.pt: UnpicklingError: Weights only load failed"):
        load_checkpoint(path)
    # torch's weights_only unpickler reads legacy files of pickle protocol 2 only: one line, no warning
    torch.save({"step": 1}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserError, match=r"^cannot read checkpoint .*evil\.pt: UnpicklingError"):
            load_checkpoint(path)
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match=r"^cannot read checkpoint .*trunc\.pt"):
        load_checkpoint(tmp_path / "trunc.pt")


def test_write_json_is_strict_json(tmp_path):
    """A NaN / inf (a diverged cls_map, an undefined statistic) is written as null: Python's NaN
    token is not JSON and strict readers reject the whole file."""
    import json
    import math

    from predet.utils import write_json

    path = tmp_path / "s.json"
    write_json(path, {"a": float("nan"), "b": [1.5, float("inf"), (2, -math.inf)], "c": {"d": 0.25}, "e": "x"})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON token {c}")) == {
        "a": None, "b": [1.5, None, [2, None]], "c": {"d": 0.25}, "e": "x"}


def test_a_single_process_takes_the_gpu_index_it_is_given(monkeypatch):
    """train.device=cuda:1 ran on cuda:0 outside torchrun; under torchrun LOCAL_RANK decides."""
    from predet import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.init("cuda:1") == torch.device("cuda", 1)
    assert distributed.init("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.init("cuda:1") == torch.device("cuda", 3)
    assert chosen == [1, 0, 3]
    assert distributed.init("cpu") == torch.device("cpu") and chosen == [1, 0, 3]


def test_folder_lock_makes_processes_take_turns(tmp_path):
    """Ranks merging their shards' records into one file take turns under folder_lock."""
    import threading

    from predet.utils import folder_lock

    order, a_in, release = [], threading.Event(), threading.Event()

    def a():
        with folder_lock(tmp_path, ".merge.lock"):
            order.append("a in")
            a_in.set()
            release.wait(10)
            order.append("a out")

    def b():
        a_in.wait(10)
        with folder_lock(tmp_path, ".merge.lock"):
            order.append("b in")

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    a_in.wait(10)
    threads[1].join(0.3)  # b is waiting for the lock, not inside it
    assert order == ["a in"]
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["a in", "a out", "b in"]


def test_device_names_are_checked_against_this_machine(monkeypatch):
    from predet.engine.common import resolve_device

    assert resolve_device("cpu") == "cpu"
    for bad in ("gpu", "cudax", "cuda:x"):
        with pytest.raises(UserError, match=rf"--device={bad!r}: expected auto, cpu or cuda"):
            resolve_device(bad, what="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cuda") == "cuda"
    with pytest.raises(UserError, match=r"train.device='cuda:5' but this machine has 1 GPU"):
        resolve_device("cuda:5")  # was a RuntimeError from set_device


def test_folder_lock_without_fcntl_still_runs_the_block(tmp_path, monkeypatch):
    import sys

    from predet.utils import folder_lock

    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    ran = []
    with folder_lock(tmp_path):
        ran.append(1)
    assert ran == [1]
