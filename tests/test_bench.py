"""``predet bench step``: the output line is parseable and consistent; the random batch is valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from predet.bench import SectionTimer, proposal_timer, random_batch
from predet.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs/pretrain/tiny_cpu.yaml")
LINE = re.compile(r"^predet_step_ms=(\d+\.\d+) cls_step_ms=(\d+\.\d+) ratio=(\d+\.\d+)$")
PROPOSAL_LINE = re.compile(r"^predet_proposal_ms=(\d+\.\d+) share=(\d+\.\d+)$")


@pytest.mark.slow
def test_bench_step_prints_the_timing_line(capsys, tmp_path, monkeypatch):
    """Without --config, from a folder that is not the checkout: the shipped tiny config."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["bench", "step", "--iters", "2", "--warmup", "1", "train.batch_size=1", "model.input_size=64"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    m = LINE.match(out[-1])
    assert m, out[-1]
    predet_ms, cls_ms, ratio = map(float, m.groups())
    assert predet_ms > 0 and cls_ms > 0
    assert abs(ratio - predet_ms / cls_ms) < 2e-3 * ratio + 1e-3
    m = PROPOSAL_LINE.match(out[-2])  # proposal selection, inside the PreDet step
    assert m, out[-2]
    proposal_ms, share = map(float, m.groups())
    assert 0 < proposal_ms < predet_ms
    assert abs(share - proposal_ms / predet_ms) < 2e-3 * share + 1e-3
    assert out[0].startswith("device=cpu") and "images=1" in out[0] and "size=64" in out[0]
    assert any(line.startswith("peak_rss=") for line in out)


def test_bench_step_bad_iters_is_a_user_error(capsys):
    assert main(["bench", "step", "--config", CONFIG, "--iters", "0"]) == 2
    assert "--iters" in capsys.readouterr().err


def test_random_batch_is_a_valid_collated_batch():
    b = random_batch(3, 5, 96, 7, seed=1)
    assert b["view1"].shape == (3, 3, 96, 96) and b["boxes2"].shape == (3, 5, 4)
    for key in ("boxes1", "boxes2"):
        boxes = b[key]
        wh = boxes[..., 2:] - boxes[..., :2]
        assert (boxes >= 0).all() and (boxes <= 96).all()
        assert (wh >= 9.6 - 1e-4).all() and (wh <= 57.6 + 1e-4).all()
    assert b["query_mask"].all() and (b["labels"].sum(1) >= 1).all()
    # read on the host as the pre-training loop does: the model's forward never waits for it
    assert b["has_queries"] is True
    assert torch.equal(random_batch(3, 5, 96, 7, seed=1)["boxes1"], b["boxes1"])


class _Twice(torch.nn.Module):
    def double(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_section_timer_wraps_sums_and_restores():
    mod = _Twice()
    timer = SectionTimer(mod, "double", cuda=False)
    assert "double" in vars(mod)  # the instance's method is the timed one
    assert mod.double(torch.tensor(3)).item() == 6  # the result passes through
    mod.double(torch.tensor(1))
    assert len(timer._pending) == 2 and timer.take() >= 0
    assert timer._pending == [] and timer.take() == 0  # take() empties the step's record
    timer.remove()
    assert "double" not in vars(mod) and mod.double(torch.tensor(2)).item() == 4


@pytest.fixture
def tiny_cfg_bench():
    from predet.config import PretrainConfig, load_config

    def make(*overrides: str):
        return load_config(PretrainConfig, CONFIG, ["model.input_size=64", *overrides])

    return make


def test_proposal_timer_picks_the_proposal_step(tiny_cfg_bench):
    from predet.modeling.predet import build_predet

    crpn = build_predet(tiny_cfg_bench(), 5)
    timer = proposal_timer(crpn, cuda=False)
    assert timer is not None and "select_proposals" in vars(crpn.crpn)
    timer.remove()
    jitter = build_predet(tiny_cfg_bench("loss.crpn=false"), 5)
    timer = proposal_timer(jitter, cuda=False)
    assert timer is not None and "forward" in vars(jitter.jitter)
    cls_only = build_predet(
        tiny_cfg_bench("loss.crpn=false", "loss.info=false", "loss.croi_reg=false"), 5
    )
    assert proposal_timer(cls_only, cuda=False) is None

