"""Time ``predet.modeling.nms.grouped_nms`` against ``torchvision.ops.nms`` on proposal-like boxes.

    python bench/nms_vs_torchvision.py [--device cpu|cuda] [--groups 640] [--k 1000] [--iters 5]
                                       [--threads N]

Each of G groups holds K boxes like a CRPN level's top-K: 70% jittered around 8 objects, 30%
anywhere in a 480-px view, random scores. Three ways, each checked against the first:
``loop``: one ``torchvision.ops.nms`` per group; ``chunked``: the offset trick in calls of <=
8192 boxes (what proposal selection did before ``grouped_nms``); ``grouped``: ``grouped_nms``.
The ways alternate; prints the median (and min) ms of each and the number of fixed-point steps ``grouped`` needed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.ops import nms

from predet.modeling import nms as nms_module
from predet.modeling.nms import grouped_nms


def proposal_like(groups: int, k: int, size: float, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    wh_obj = (0.1 + 0.5 * torch.rand(groups, 8, 2, generator=g)) * size
    ctr_obj = torch.rand(groups, 8, 2, generator=g) * size
    pick = torch.randint(0, 8, (groups, k), generator=g)
    wh = wh_obj.gather(1, pick[..., None].expand(-1, -1, 2))
    ctr = ctr_obj.gather(1, pick[..., None].expand(-1, -1, 2))
    ctr = ctr + 0.15 * wh * torch.randn(groups, k, 2, generator=g)
    wh = wh * torch.exp(0.25 * torch.randn(groups, k, 2, generator=g))
    loose = torch.rand(groups, k, generator=g) < 0.3
    ctr = torch.where(loose[..., None], torch.rand(groups, k, 2, generator=g) * size, ctr)
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 2).clamp(0, size)
    scores = torch.randn(groups, k, generator=g)
    valid = ((boxes[..., 2:] - boxes[..., :2]) > 1e-3).all(2)
    return boxes, scores, valid


def loop(boxes, scores, valid, t):
    out = []
    for b, s, v in zip(boxes, scores, valid):
        i = v.nonzero().squeeze(1)
        out.append(i[nms(b[i], s[i], t)])
    return out


def chunked(boxes, scores, valid, t, max_boxes=8192):
    G, K = scores.shape
    flat_b, flat_s = boxes.reshape(G * K, 4), scores.reshape(G * K)
    group = torch.arange(G, device=boxes.device).repeat_interleave(K)
    keep = valid.reshape(G * K)
    per = max(1, max_boxes // K)
    kept = []
    for start in range(0, G * K, per * K):
        chunk = torch.arange(start, min(start + per * K, G * K), device=boxes.device)
        chunk = chunk[keep[chunk]]
        off = group[chunk].to(flat_b) * (flat_b[chunk].max() + 1)
        kept.append(chunk[nms(flat_b[chunk] + off[:, None], flat_s[chunk], t)])
    return torch.cat(kept)  # indices into G * K, group by group


def grouped(boxes, scores, valid, t):
    return grouped_nms(boxes, scores, valid, t)  # index [G, K], kept [G, K]


def per_group(name, out, G, K):
    """Each way's result as a list of per-group index tensors (not timed)."""
    if name == "chunked":
        group = out // K
        return [out[group == g] - g * K for g in range(G)]
    if name == "grouped":
        return [row[m] for row, m in zip(*out)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--groups", type=int, default=640)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--thresh", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--skip-chunked", action="store_true", help="time loop and grouped only")
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    boxes, scores, valid = (x.to(dev) for x in proposal_like(a.groups, a.k, 480.0, 0))

    steps = []
    greedy = nms_module._greedy

    def greedy_step(chunks, prev, valid):  # one fixed-point step, as in nms._greedy
        out, start = [], 0
        for s in chunks:
            g = s.shape[0]
            hit = torch.bmm(prev[start : start + g].to(s.dtype).unsqueeze(1), s).squeeze(1)
            out.append(valid[start : start + g] & (hit == 0))
            start += g
        return torch.cat(out)

    def counting(chunks, valid, first_round):  # steps to the fixed point, the confirming one too
        keep, n = valid, 0
        while True:
            new, n = greedy_step(chunks, keep, valid), n + 1
            if torch.equal(new, keep):
                break
            keep = new
        steps.append(n)
        return keep

    ref = loop(boxes, scores, valid, a.thresh)
    for name, fn in (("chunked", chunked), ("grouped", grouped)):
        if name == "chunked" and a.skip_chunked:
            continue
        got = per_group(name, fn(boxes, scores, valid, a.thresh), a.groups, a.k)
        differ = sum(not torch.equal(x, y) for x, y in zip(ref, got))
        print(f"{name} equals loop: {differ == 0} ({differ} of {a.groups} groups differ)")
    nms_module._greedy = counting
    grouped(boxes, scores, valid, a.thresh)
    nms_module._greedy = greedy
    kept = sum(len(r) for r in ref) / a.groups
    print(
        f"device={dev} G={a.groups} K={a.k} thresh={a.thresh} kept/group={kept:.1f} "
        f"threads={torch.get_num_threads()}"
    )
    ways = {"loop": loop, "chunked": chunked, "grouped": grouped}
    if a.skip_chunked:
        del ways["chunked"]
    ts: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(a.iters + 1):  # the ways alternate, so a load change hits all alike
        for name, fn in ways.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(boxes, scores, valid, a.thresh)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first round warms up
                ts[name].append((time.perf_counter() - t0) * 1e3)
    times = {name: (statistics.median(t), min(t)) for name, t in ts.items()}
    print(
        " ".join(f"{k}_ms={m:.2f} (min {lo:.2f})" for k, (m, lo) in times.items())
        + f" grouped_steps={steps[0]}"
    )


if __name__ == "__main__":
    main()
