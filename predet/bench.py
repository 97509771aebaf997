"""``predet bench step``: time the PreDet training step against the cls-only step.

Both models share the backbone + FPN weights and see the same random batch (N images, two
views, Q valid query boxes each, of the config's input size); each step is forward + backward +
SGD step. After ``--warmup`` steps of each, the two steps alternate ``--iters`` times (so a
load change on a shared machine hits both alike) and the medians are reported. On CUDA the
steps run as pre-training does: under autocast in ``train.amp_dtype`` (bf16 by default; float16
with a ``GradScaler``) when ``train.amp``, with channels_last inputs and weights.

Proposal selection (the CRPN's ``select_proposals``: max over queries, decode, top-K per level,
NMS, K_nms per view; or, with the CRPN off, the jittered boxes) is timed inside the PreDet step:
CUDA events around it on CUDA (no extra sync in the step), the wall clock on CPU; its median per
step is printed as ``predet_proposal_ms=<float> share=<float>`` (share: of the PreDet step).

With ``--profile N``, N more PreDet steps run under ``torch.profiler`` after the timing, each
part of the model inside a labelled range (``P::backbone``, ``P::cls_head``, ``P::box_features``
and its ``P::roi_pool`` / ``P::box_head``, ``P::crpn`` and its ``P::crpn.head`` /
``P::crpn.losses`` / ``P::crpn.select_proposals`` (or ``P::jitter``), ``P::croi_head``, then
``P::backward`` and ``P::optimizer``): their time per step (device time on CUDA, CPU time on
CPU; a part includes the parts inside it, forward only unless named) and the costliest
operators are printed before the timing lines; ``--trace FILE`` also writes a Chrome trace.

The last line is ``predet_step_ms=<float> cls_step_ms=<float> ratio=<float>``.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from predet.config import PretrainConfig
from predet.engine.common import resolve_device
from predet.modeling.predet import PreDet, build_predet, cls_only_config

__all__ = ["random_batch", "time_steps", "profile_steps", "labelled_parts", "SectionTimer", "bench_step"]

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_AMP_NAMES = {"bfloat16": "bf16", "float16": "fp16"}  # the start line's amp=


def amp_step_parts(cuda: bool, amp: bool, amp_dtype: str = "bfloat16") -> tuple[Any, torch.amp.GradScaler]:
    """The forward's autocast and the loss scaler of a training step, as pre-training has them:
    autocast in ``amp_dtype`` (``train.amp_dtype``: bfloat16 | float16) on CUDA when ``amp``, a
    ``GradScaler`` for float16 only; on CPU (or without ``amp``) neither (float32, scaler off)."""
    use_amp = cuda and amp
    autocast = torch.autocast("cuda", dtype=_AMP_DTYPES[amp_dtype]) if use_amp else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == "float16")
    return autocast, scaler

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
        "has_queries": True,  # set on the host, as the pre-training's loop does: no device wait
    }


class SectionTimer:
    """Time every call of one method of a module, summed per step.

    On CUDA, events recorded around the call measure the stream's time from its start to its
    end (read after the step's synchronize, so the step gains no sync); on CPU, the wall clock.
    """

    def __init__(self, module: torch.nn.Module, method: str, cuda: bool) -> None:
        self.cuda = cuda
        self._pending: list[Any] = []
        inner: Callable[..., Any] = getattr(module, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                out = inner(*args, **kwargs)
                end.record()
                self._pending.append((start, end))
            else:
                t0 = time.perf_counter()
                out = inner(*args, **kwargs)
                self._pending.append((time.perf_counter() - t0) * 1e3)
            return out

        self._module, self._method = module, method
        setattr(module, method, timed)  # an instance attribute: shadows the class's method

    def remove(self) -> None:
        """Give the module its own method back."""
        delattr(self._module, self._method)

    def take(self) -> float:
        """ms spent in the method since the last ``take`` (call after the step has synced)."""
        if self.cuda:
            total = sum(start.elapsed_time(end) for start, end in self._pending)
        else:
            total = sum(self._pending)
        self._pending.clear()
        return total


def proposal_timer(model: PreDet, cuda: bool) -> SectionTimer | None:
    """A timer on the model's proposal selection (None for the cls-only model)."""
    if model.crpn is not None:
        return SectionTimer(model.crpn, "select_proposals", cuda)
    if model.jitter is not None:
        return SectionTimer(model.jitter, "forward", cuda)
    return None


# (label, module path in PreDet, method): the labelled ranges of a profiled step, outer first
PARTS = (
    ("backbone", "backbone", "forward"),
    ("cls_head", "cls_head", "forward"),
    ("box_features", "", "_box_features"),
    ("roi_pool", "roi_pool", "forward"),
    ("box_head", "box_head", "forward"),
    ("crpn", "crpn", "forward"),
    ("crpn.head", "crpn.head", "forward"),
    ("crpn.losses", "crpn", "losses"),
    ("crpn.select_proposals", "crpn", "select_proposals"),
    ("jitter", "jitter", "forward"),
    ("croi_head", "croi_head", "forward"),
)


@contextmanager
def labelled_parts(model: PreDet) -> Iterator[list[str]]:
    """Run each part of ``model`` (``PARTS``, those it has) inside ``record_function("P::<label>")``;
    yields the labels. The model's own methods are back on exit."""
    wrapped: list[tuple[Any, str]] = []
    labels: list[str] = []
    try:
        for label, path, method in PARTS:
            owner: Any = model
            for name in filter(None, path.split(".")):
                owner = getattr(owner, name, None)
            if owner is None:
                continue
            inner = getattr(owner, method)

            def ranged(*args: Any, _inner: Callable[..., Any] = inner, _name: str = "P::" + label,
                       **kwargs: Any) -> Any:  # fmt: skip
                with record_function(_name):
                    return _inner(*args, **kwargs)

            setattr(owner, method, ranged)  # an instance attribute: shadows the class's method
            wrapped.append((owner, method))
            labels.append("P::" + label)
        yield labels + ["P::backward", "P::optimizer"]
    finally:
        for owner, method in wrapped:
            delattr(owner, method)


def _device_total(evt: Any) -> float:
    """An averaged profiler event's device time in us (``device_time_total`` from torch 2.4's
    rename on, ``cuda_time_total`` before)."""
    return float(getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)))


def profile_steps(
    model: PreDet,
    batch: dict[str, torch.Tensor],
    *,
    steps: int,
    amp: bool,
    amp_dtype: str = "bfloat16",
    rows: int = 25,
    trace: str | None = None,
) -> tuple[dict[str, float], str]:
    """``steps`` PreDet training steps under ``torch.profiler``, each part labelled.

    Returns the ms per step of each labelled part (device time on CUDA, CPU time on CPU; a part
    includes the parts called inside it) and the operator table (top ``rows`` by self time).
    """
    cuda = batch["view1"].device.type == "cuda"
    autocast, scaler = amp_step_parts(cuda, amp, amp_dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # on CUDA the backward's kernels are launched from autograd's device thread, outside a range
    # opened on this one: the backward and the optimizer are timed with CUDA events instead
    cuda_events: dict[str, list[tuple[Any, Any]]] = {"P::backward": [], "P::optimizer": []}

    def timed(label: str, fn: Callable[[], Any]) -> None:
        with record_function(label):
            if not cuda:
                fn()
                return
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            cuda_events[label].append((start, end))

    with ExitStack() as stack:
        labels = stack.enter_context(labelled_parts(model))
        prof = stack.enter_context(profile(activities=activities))
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = model(batch)
            loss = sum(v for k, v in out.items() if k.startswith("loss_"))
            timed("P::backward", lambda: scaler.scale(loss).backward())
            timed("P::optimizer", lambda: (scaler.step(opt), scaler.update()))
        if cuda:
            torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.key_averages()
    per_step: dict[str, float] = {}
    for evt in events:
        if evt.key in labels:  # on CUDA a range is listed twice: its CPU side and its GPU side
            t = _device_total(evt) if cuda else float(evt.cpu_time_total)
            per_step[evt.key] = max(per_step.get(evt.key, 0.0), t / steps / 1e3)
    for label, pairs in cuda_events.items():
        if pairs:
            per_step[label] = sum(a.elapsed_time(b) for a, b in pairs) / steps
    ordered = {k: per_step[k] for k in labels if k in per_step}
    if cuda:
        sort_by = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    else:
        sort_by = "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)
    return ordered, table


def time_steps(
    models: dict[str, PreDet],
    batch: dict[str, torch.Tensor],
    *,
    iters: int,
    warmup: int,
    amp: bool,
    amp_dtype: str = "bfloat16",
) -> dict[str, dict[str, float]]:
    """Median wall time per step (``ms``), median CPU time of this process per step (``cpu_ms``,
    all threads), peak memory (``peak_mib``; CUDA only, else NaN) and median time in proposal
    selection per step (``proposal_ms``; NaN for a model without proposals) of each model.

    Every model steps on the same ``batch``; timings alternate between the models.
    """
    device = batch["view1"].device
    cuda = device.type == "cuda"
    timers = {k: proposal_timer(m, cuda) for k, m in models.items()}
    autocast, scaler = amp_step_parts(cuda, amp, amp_dtype)
    opts = {
        k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        for k, m in models.items()
    }

    def step(name: str) -> tuple[float, float, float]:
        model, opt, timer = models[name], opts[name], timers[name]
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(batch)
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        return wall, cpu, (timer.take() if timer is not None else float("nan"))

    peak = {}
    for name in models:  # warm-up, and the peak memory of each step on its own
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(max(warmup, 1)):
            step(name)
        peak[name] = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in models}
    for _ in range(iters):
        for name in models:
            times[name].append(step(name))
    for timer in timers.values():
        if timer is not None:
            timer.remove()
    return {
        n: {
            "ms": statistics.median(w for w, _, _ in t),
            "cpu_ms": statistics.median(c for _, c, _ in t),
            "peak_mib": peak[n],
            "proposal_ms": statistics.median(p for _, _, p in t),
        }
        for n, t in times.items()
    }


def bench_step(
    cfg: PretrainConfig,
    *,
    iters: int = 10,
    warmup: int = 3,
    profile: int = 0,
    profile_rows: int = 25,
    trace: Optional[str] = None,
) -> dict[str, dict[str, float]]:
    """Time a PreDet pre-training step against the same model's cls-only step (:func:`time_steps`,
    ``iters`` steps after ``warmup``) on a random batch of ``cfg``'s shape, on ``cfg.train.device``;
    then, with ``profile`` > 0, profile that many PreDet steps (:func:`profile_steps`: time per
    model part, the top ``profile_rows`` operators, a Chrome ``trace`` file). Prints the report;
    returns :func:`time_steps`' results."""
    device = torch.device(resolve_device(cfg.train.device))  # as pretrain reads it
    if device.type == "cuda":  # synchronize, events and the peak memory act on the current GPU
        torch.cuda.set_device(device.index or 0)
    torch.manual_seed(cfg.seed)
    num_classes = cfg.model.num_classes or DEFAULT_NUM_CLASSES
    predet = build_predet(cfg, num_classes)
    cls_only = build_predet(cls_only_config(cfg), num_classes)
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
        k: (v if not isinstance(v, torch.Tensor) else v.to(device, memory_format=fmt) if v.dim() == 4 else v.to(device))
        for k, v in batch.items()
    }

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    print(
        f"device={name} threads={threads} backbone={cfg.model.backbone} "
        f"size={cfg.model.input_size} images={cfg.train.batch_size} "
        f"views={2 * cfg.train.batch_size} queries={cfg.data.queries_per_image} "
        f"amp={_AMP_NAMES[cfg.train.amp_dtype] if device.type == 'cuda' and cfg.train.amp else 'off'} "
        f"channels_last={channels_last} iters={iters} warmup={warmup}"
    )
    res = time_steps(models, batch, iters=iters, warmup=warmup, amp=cfg.train.amp,
                     amp_dtype=cfg.train.amp_dtype)  # fmt: skip
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
    if profile:
        parts, table = profile_steps(
            predet, batch, steps=profile, amp=cfg.train.amp, amp_dtype=cfg.train.amp_dtype,
            rows=profile_rows,
            trace=trace,
        )  # fmt: skip
        print(table)
        kind = "device" if device.type == "cuda" else "CPU"
        print(f"profile: {profile} PreDet steps, {kind} ms per step by part "
              f"(each includes the parts called inside it)")  # fmt: skip
        for label, ms in parts.items():
            print(f"  {label:<28s} {ms:9.2f}")
        if trace:
            print(f"trace: {trace}")
    p, c = res["predet"]["ms"], res["cls"]["ms"]
    prop = res["predet"]["proposal_ms"]
    print(f"predet_proposal_ms={prop:.2f} share={prop / p:.3f}")
    print(f"predet_step_ms={p:.2f} cls_step_ms={c:.2f} ratio={p / c:.3f}")
    return res
