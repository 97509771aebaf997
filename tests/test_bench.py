"""``predet bench step``: the output line is parseable and consistent; the random batch is valid."""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from predet.bench import SectionTimer, labelled_parts, profile_steps, proposal_timer, random_batch
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
        rc = main(["bench", "step", "--iters", "2", "--warmup", "1", "--profile", "1",
                   "train.batch_size=1", "model.input_size=64"])  # fmt: skip
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
    head = out.index("profile: 1 PreDet steps, CPU ms per step by part (each includes the parts called inside it)")
    part = re.match(r"^  P::backbone +(\d+\.\d+)$", out[head + 1])
    assert part and float(part.group(1)) > 0


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


def test_profile_labels_every_part_and_nests_them(tiny_cfg_bench):
    """--profile: each part of the PreDet step in its own range, parts inside their callers."""
    from predet.modeling.predet import build_predet

    torch.manual_seed(0)
    model = build_predet(tiny_cfg_bench("train.batch_size=2"), 5)
    batch = random_batch(2, 4, 64, 5, seed=0)
    parts, table = profile_steps(model, batch, steps=2, amp=False, rows=5)
    expected = ["P::backbone", "P::cls_head", "P::box_features", "P::roi_pool", "P::box_head",
                "P::crpn", "P::crpn.head", "P::crpn.losses", "P::crpn.select_proposals",
                "P::croi_head", "P::backward", "P::optimizer"]  # fmt: skip
    assert list(parts) == expected  # the order of PARTS, outer first; no jitter with the CRPN on
    assert all(ms > 0 for ms in parts.values())
    # an outer range includes what runs inside it (CPU time, measured in the same step)
    assert parts["P::box_features"] >= parts["P::roi_pool"] + parts["P::box_head"]
    crpn_inner = parts["P::crpn.head"] + parts["P::crpn.losses"] + parts["P::crpn.select_proposals"]
    assert parts["P::crpn"] >= crpn_inner
    assert "Self CPU" in table and len(table.splitlines()) <= 5 + 8  # 5 operators + frame
    for owner in (model, model.backbone, model.crpn, model.crpn.head, model.croi_head):
        assert not [k for k in vars(owner) if k in ("forward", "losses", "select_proposals", "_box_features")]

    jitter = build_predet(tiny_cfg_bench("loss.crpn=false"), 5)
    with labelled_parts(jitter) as labels:
        assert "P::jitter" in labels and "P::crpn" not in labels
        assert "forward" in vars(jitter.jitter)
    assert "forward" not in vars(jitter.jitter)


def test_bench_step_trace_needs_profile(capsys):
    assert main(["bench", "step", "--config", CONFIG, "--trace", "t.json"]) == 2
    assert "--trace" in capsys.readouterr().err


@pytest.mark.slow
def test_e2e_script_compares_the_run_with_its_bench_step(tmp_path):
    """bench/e2e_gpu.sh on the CPU with a tiny budget (issue 11's end-to-end check): its figures
    are the bench line's PreDet images/s and the mean of the run's logged images_per_s."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "e2e_gpu.sh"
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PREDET_CACHE": str(tmp_path / "cache"), "CFG": CONFIG, "DATA": "builtin:tiny", "BATCH": "2", "DEVICE": "cpu",
           "STEPS": "6", "LOG_EVERY": "2", "SKIP": "1", "ITERS": "2", "WARMUP": "1", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path / "tmp")}  # fmt: skip
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    predet_ms = float(LINE.match(lines[-3]).group(1))
    rows = [float(x) for x in re.match(r"^e2e rows: \[(.*)\]$", lines[-2]).group(1).split(", ")]
    m = re.match(r"^e2e_images_s=(\d+\.\d) bench_images_s=(\d+\.\d) fraction=(\d+\.\d+)$", lines[-1])
    e2e, bench, fraction = map(float, m.groups())
    assert len(rows) == 2  # steps 4 and 6: the row of step 2 is the loader's warm-up
    assert e2e == pytest.approx(sum(rows) / 2, abs=0.06)
    assert bench == pytest.approx(2 * 1000 / predet_ms, abs=0.06)
    assert fraction == pytest.approx(e2e / bench, rel=0.02)
    assert list((tmp_path / "tmp").iterdir()) == []  # the run folder is removed


def test_bench_data_too_small_a_view_is_an_error_before_any_work(capsys):
    assert main(["bench", "data", "--size", "4"]) == 2  # was a ValueError after the query benchmark
    err = capsys.readouterr()
    assert err.err.strip() == "predet: error: --size 4: views must be >= 8 px" and err.out == ""


@pytest.mark.parametrize("amp_dtype,dtype,scaled", [("bfloat16", torch.bfloat16, False), ("float16", torch.float16, True)])
def test_step_autocast_follows_amp_dtype(monkeypatch, amp_dtype, dtype, scaled):
    """On CUDA the benchmarked step runs as pre-training's: autocast in train.amp_dtype, a
    GradScaler for float16 only (bench step used bf16 whatever the config said)."""
    import predet.bench as bench

    made = {}
    monkeypatch.setattr(bench.torch, "autocast", lambda device, dtype: made.setdefault("autocast", (device, dtype)))
    monkeypatch.setattr(bench.torch.amp, "GradScaler", lambda device, enabled: made.setdefault("scaler", enabled))
    bench.amp_step_parts(True, True, amp_dtype)
    assert made == {"autocast": ("cuda", dtype), "scaler": scaled}
    made.clear()
    autocast, _ = bench.amp_step_parts(True, False, amp_dtype)  # train.amp=false: float32
    assert made == {"scaler": False} and isinstance(autocast, nullcontext)


def test_step_on_cpu_runs_in_float32_without_a_scaler(tiny_cfg_bench):
    """On CPU neither autocast nor loss scaling, whatever train.amp / amp_dtype say: one step of
    time_steps with float16 asked for moves the weights exactly as one with amp off."""
    from predet.bench import amp_step_parts, time_steps
    from predet.modeling.predet import build_predet

    autocast, scaler = amp_step_parts(False, True, "float16")
    assert isinstance(autocast, type(nullcontext())) and not scaler.is_enabled()
    cfg = tiny_cfg_bench("train.batch_size=1")
    batch = random_batch(1, cfg.data.queries_per_image, 64, 5, seed=0)
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in build_predet(cfg, 5).parameters()])
    weights = []
    for amp, amp_dtype in ((False, "bfloat16"), (True, "float16")):
        torch.manual_seed(0)
        model = build_predet(cfg, 5).train()
        time_steps({"predet": model}, batch, iters=1, warmup=1, amp=amp, amp_dtype=amp_dtype)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], start)
