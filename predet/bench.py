"""``predet bench step``: time the PreDet training step against the cls-only step.

Both models share the backbone + FPN weights and see the same random batch (N images, two
views, Q valid query boxes each, of the config's input size); each step is forward + backward +
SGD step. After ``--warmup`` steps of each, the two steps alternate ``--iters`` times (so a
load change on a shared machine hits both alike) and the medians are reported. On CUDA the
steps run under bf16 autocast with channels_last inputs and weights, as pre-training does.

The last line is ``predet_step_ms=<float> cls_step_ms=<float> ratio=<float>``.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import time
from contextlib import nullcontext

import torch

from predet.config import PretrainConfig, load_config
from predet.errors import UserError
from predet.modeling.predet import PreDet, build_predet

__all__ = ["random_batch", "time_steps", "run"]

DEFAULT_NUM_CLASSES = 20


def random_batch(
    num_images: int, num_queries: int, size: int, num_classes: int, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A collated two-view batch of noise images with ``num_queries`` valid boxes per view.

    Boxes have sides between 10% and 60% of the view, inside the view.
    """
    g = torch.Generator().manual_seed(seed)

    def boxes() -> torch.Tensor:
        wh = (0.1 + 0.5 * torch.rand(num_images, num_queries, 2, generator=g)) * size
        xy = torch.rand(num_images, num_queries, 2, generator=g) * (size - wh)
        return torch.cat([xy, xy + wh], dim=2)  # [N, Q, 4] XYXY

    labels = (torch.rand(num_images, num_classes, generator=g) < 0.2).float()
    labels[:, 0] = 1.0  # every image has a label
    return {
        "view1": torch.randn(num_images, 3, size, size, generator=g),
        "view2": torch.randn(num_images, 3, size, size, generator=g),
        "boxes1": boxes(),
        "boxes2": boxes(),
        "query_mask": torch.ones(num_images, num_queries, dtype=torch.bool),
        "labels": labels,
    }


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' requested but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"train.device: unknown device '{name}' (auto, cpu or cuda)")
    return torch.device(name)


def time_steps(
    models: dict[str, PreDet],
    batch: dict[str, torch.Tensor],
    *,
    iters: int,
    warmup: int,
    amp: bool,
) -> dict[str, dict[str, float]]:
    """Median wall time per step (``ms``), median CPU time of this process per step (``cpu_ms``,
    all threads) and peak memory (``peak_mib``; CUDA only, else NaN) of each model.

    Every model steps on the same ``batch``; timings alternate between the models.
    """
    device = batch["view1"].device
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and amp) else nullcontext()
    opts = {
        k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        for k, m in models.items()
    }

    def step(name: str) -> tuple[float, float]:
        model, opt = models[name], opts[name]
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(batch)
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

    peak = {}
    for name in models:  # warm-up, and the peak memory of each step on its own
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(max(warmup, 1)):
            step(name)
        peak[name] = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(iters):
        for name in models:
            times[name].append(step(name))
    return {
        n: {
            "ms": statistics.median(w for w, _ in t),
            "cpu_ms": statistics.median(c for _, c in t),
            "peak_mib": peak[n],
        }
        for n, t in times.items()
    }


def run(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if args.iters < 1:
        raise UserError(f"--iters: must be >= 1, got {args.iters}")
    device = _device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    num_classes = cfg.model.num_classes or DEFAULT_NUM_CLASSES
    predet = build_predet(cfg, num_classes)
    cls_cfg = copy.deepcopy(cfg)
    cls_cfg.loss.crpn = cls_cfg.loss.info = cls_cfg.loss.croi_reg = False
    cls_cfg.loss.cls = True
    cls_only = build_predet(cls_cfg, num_classes)
    cls_only.backbone.load_state_dict(predet.backbone.state_dict())
    cls_only.cls_head.load_state_dict(predet.cls_head.state_dict())

    channels_last = device.type == "cuda" and cfg.train.channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = {"predet": predet, "cls": cls_only}
    for m in models.values():
        m.to(device, memory_format=fmt).train()
    batch = random_batch(
        cfg.train.batch_size, cfg.data.queries_per_image, cfg.model.input_size, num_classes,
        seed=cfg.seed,
    )  # fmt: skip
    batch = {
        k: (v.to(device, memory_format=fmt) if v.dim() == 4 else v.to(device))
        for k, v in batch.items()
    }

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    print(
        f"device={name} threads={threads} backbone={cfg.model.backbone} "
        f"size={cfg.model.input_size} images={cfg.train.batch_size} "
        f"views={2 * cfg.train.batch_size} queries={cfg.data.queries_per_image} "
        f"amp={'bf16' if device.type == 'cuda' and cfg.train.amp else 'off'} "
        f"channels_last={channels_last} iters={args.iters} warmup={args.warmup}"
    )
    res = time_steps(models, batch, iters=args.iters, warmup=args.warmup, amp=cfg.train.amp)
    imgs = cfg.train.batch_size
    for k, r in res.items():
        print(f"{k}: {r['ms']:.1f} ms/step  {imgs / r['ms'] * 1e3:.1f} images/s", end="")
        if device.type == "cuda":
            print(f"  peak_mem={r['peak_mib']:.0f} MiB")
        else:  # on a shared machine, wall time / CPU time far above 1/threads means contention
            print(f"  cpu={r['cpu_ms']:.1f} ms/step")
    if device.type != "cuda":  # ru_maxrss is in KiB on Linux
        print(f"peak_rss={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"load_avg_1min={load:.2f} cpus={os.cpu_count()}")
    p, c = res["predet"]["ms"], res["cls"]["ms"]
    print(f"predet_step_ms={p:.2f} cls_step_ms={c:.2f} ratio={p / c:.3f}")
    return 0
