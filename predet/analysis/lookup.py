"""``predet analyze lookup --run RUN --out DIR``: the query-box lookup, in numbers and pictures
(DESIGN §1.5: query-lookup accuracy, pictures of queries / proposals / retrievals).

A pre-training run's model (``RUN/checkpoints/last.pt`` or ``--ckpt``) on its own data, as it
trains: two augmented views of each image, the queries of one view looked up in the other, in
both directions (``PreDet.lookup``: the CRPN's proposals for the searched view, then the CROI
head's cosine similarity of each query to each proposal). For every valid query it records the
query box, its target (the same box in the searched view), the best-scoring proposal (the
retrieval), their IoU and the similarity, and reports

- ``lookup_top1_proposals``: the fraction of queries whose retrieval has IoU > 0.5 with the
  target, only the proposals competing: what the model finds, not what it is given. Training's
  ``lookup_top1`` (``metrics.jsonl``) differs: there the query boxes themselves, which the CROI
  head appends to the candidates, compete too, and a query that picks its own box scores a hit;
- ``chance_top1``: the same for a proposal drawn uniformly from the valid ones (the floor);
- ``crpn_recall``: the fraction of queries with any proposal of IoU > 0.5 (the ceiling).

It writes ``DIR/lookup.json`` (those numbers, then one record per query) and, for the first
``--pictures`` images, ``DIR/lookup_000.png``, ...: one row per query (up to ``--queries``), the
query in view 1 on the left and view 2 on the right with the target (dashed white), the
retrieval (green when it hits, red when it misses) and the next best proposals (thin yellow).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torchvision.ops import box_iou

from predet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from predet.errors import UserError

__all__ = ["lookup", "summarize", "draw_lookup", "write_lookup", "format_summary"]

HIT_IOU = 0.5


def _samples(dataset: Any, count: int, seed: int) -> tuple[list[dict], list[str]]:
    """``count`` two-view samples (a seeded draw of a map-style dataset, the first ones of a
    stream) and the names of the images they were made from."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        out, names = [], []
        for k, s in enumerate(dataset):
            if k >= count:
                break
            out.append(s)
            names.append(str(s.get("image", f"stream item {k}")))
        return out, names
    n = len(dataset)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))
    out = [dataset[int(i)] for i in idx]
    # an unreadable image is replaced by the next readable one (``skipped`` places further on)
    return out, [str(dataset.paths[(int(i) + int(s.get("skipped", 0))) % n]) for i, s in zip(idx, out)]


def _records(out: dict[str, torch.Tensor], names: list[str], first: int, top: int) -> list[dict]:
    """One record per valid (searched view, query) of one batch of ``PreDet.lookup``; the batch's
    images are samples ``first, first + 1, ...``."""
    B = out["boxes"].shape[0]
    N = B // 2
    recs = []
    for b in range(B):
        n, searched = b % N, 2 if b >= N else 1
        props = out["proposals"][b][out["valid"][b]].float()  # [P_b, 4]
        for q in torch.nonzero(out["mask"][b]).flatten().tolist():
            target = out["boxes"][b, q].float()
            rec = {
                "sample": first + n, "image": names[n], "direction": f"{3 - searched}->{searched}", "query_index": q,
                "query": out["boxes"][(b + N) % B, q].tolist(), "target": target.tolist(),
                "proposals": int(props.shape[0]),
            }  # fmt: skip
            if props.shape[0] == 0:
                recs.append({**rec, "retrieved": [], "sim": [], "iou": [], "hit": False, "chance": 0.0,
                             "covered": False})  # fmt: skip
                continue
            sim = out["sim"][b, q][out["valid"][b]].float()
            iou = box_iou(target[None], props)[0]
            order = torch.argsort(sim, descending=True, stable=True)[:top]
            recs.append({
                **rec,
                "retrieved": props[order].tolist(), "sim": sim[order].tolist(), "iou": iou[order].tolist(),
                "hit": bool(iou[order[0]] > HIT_IOU), "chance": float((iou > HIT_IOU).float().mean()),
                "covered": bool((iou > HIT_IOU).any()),
            })  # fmt: skip
    return recs


def summarize(records: list[dict]) -> dict[str, Any]:
    """``lookup_top1_proposals``, ``chance_top1``, ``crpn_recall`` (means over the records; None
    without any) and ``queries``."""
    n = len(records)
    mean = (lambda key: sum(float(r[key]) for r in records) / n) if n else (lambda key: None)
    return {
        "queries": n, "lookup_top1_proposals": mean("hit"), "chance_top1": mean("chance"),
        "crpn_recall": mean("covered"),
    }  # fmt: skip


def lookup(
    run: str | Path,
    *,
    ckpt: Optional[str | Path] = None,
    images: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    top: int = 3,
    device: str = "cpu",
) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """The lookup of ``images`` images of ``run``'s data by its checkpoint.

    Returns the summary, the per-query records and, per image, its two views (uint8 ``[S, S, 3]``
    arrays, as the model saw them) for :func:`draw_lookup`.
    """
    from predet.config import PretrainConfig, load_config
    from predet.data.datasets import build_pretrain_data
    from predet.engine.common import check_state_fits, checkpoint_path, load_training_checkpoint
    from predet.modeling.predet import build_predet, has_croi_head

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"--run {run}: no config.yaml (not a pre-training run folder)")
    if images < 1 or batch_size < 1:
        raise UserError(f"--images {images} / --batch-size {batch_size}: must be >= 1")
    cfg = load_config(PretrainConfig, run / "config.yaml")
    if not has_croi_head(cfg.loss):
        raise UserError(f"{run}: a run without the CROI head (loss.info and loss.croi_reg off): it has no lookup")
    path = Path(ckpt) if ckpt else checkpoint_path(run)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    state = load_training_checkpoint(path)
    data = build_pretrain_data(cfg)
    classes = list(state.get("classes") or data.classes)
    if classes != list(data.classes):
        raise UserError(f"{path}: its classes are not those of {run}/config.yaml's data (the data changed since)")
    torch.manual_seed(seed)  # the jittered boxes of a CRPN-off run
    model = build_predet(cfg, len(classes))
    check_state_fits(model, state["model"], path)
    model.load_state_dict(state["model"])
    model.eval().to(device)
    samples, names = _samples(data.dataset, images, seed)
    if not samples:
        raise UserError(f"{run}: its data holds no image")
    transform = getattr(data.dataset, "transform", None)  # the views' normalisation, undone to draw them
    mean = getattr(transform, "mean", torch.tensor(IMAGENET_MEAN)).view(1, 3, 1, 1)
    std = getattr(transform, "std", torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    records: list[dict] = []
    views: list[dict] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = data.collate_fn(chunk)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = model.lookup(batch)
        records += _records({k: v.cpu() for k, v in out.items()}, names[start : start + len(chunk)], start, top)
        for key in ("view1", "view2"):
            batch[key] = (batch[key].cpu().float() * std + mean) * 255
            batch[key] = batch[key].clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        views += [{"sample": start + n, "image": names[start + n], "view1": batch["view1"][n],
                   "view2": batch["view2"][n]} for n in range(len(chunk))]  # fmt: skip
    summary = {"run": str(run), "checkpoint": str(path), "images": len(samples), **summarize(records)}
    return summary, records, views


def draw_lookup(view: dict, records: list[dict], path: str | Path, *, queries: int = 3) -> int:
    """One picture of an image's lookup from view 1 into view 2 (its first ``queries`` queries);
    returns the number of rows drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = [r for r in records if r["sample"] == view["sample"] and r["direction"] == "1->2"][:queries]
    if not rows:
        return 0
    fig, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), squeeze=False)

    def box(ax, b, color, lw, ls="-"):
        x1, y1, x2, y2 = b
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=lw, linestyle=ls))

    for (left, right), r in zip(axes, rows):
        left.imshow(view["view1"])
        box(left, r["query"], "cyan", 2.5)
        left.set_title(f"query {r['query_index']} (view 1)", fontsize=9)
        right.imshow(view["view2"])
        for b in r["retrieved"][1:][::-1]:
            box(right, b, "yellow", 1.0)
        box(right, r["target"], "white", 2.0, "--")
        if r["retrieved"]:
            box(right, r["retrieved"][0], "lime" if r["hit"] else "red", 2.5)
            right.set_title(f"retrieved: IoU {r['iou'][0]:.2f}, sim {r['sim'][0]:.2f}", fontsize=9)
        else:
            right.set_title("no proposal", fontsize=9)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(Path(view["image"]).name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return len(rows)


def write_lookup(
    out: str | Path, summary: dict, records: list[dict], views: list[dict], *, pictures: int = 8, queries: int = 3
) -> int:
    """``OUT/lookup.json`` and the pictures of the first ``pictures`` images (an earlier call's
    pictures are removed first, not mixed in); returns the number of pictures."""
    from predet.utils import write_json

    if pictures < 0 or queries < 1:
        raise UserError(f"--pictures {pictures} / --queries {queries}: must be >= 0 / >= 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("lookup_[0-9][0-9][0-9].png"):
        old.unlink()
    write_json(out / "lookup.json", {**summary, "records": records})
    drawn = 0
    for k, view in enumerate(views[:pictures]):
        drawn += draw_lookup(view, records, out / f"lookup_{k:03d}.png", queries=queries) > 0
    return drawn


def format_summary(summary: dict) -> str:
    """One line: the lookup's accuracy against chance and the CRPN's recall."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"lookup of {summary['images']} images ({summary['queries']} queries, both directions, proposals "
            f"only): lookup_top1_proposals {fmt(summary['lookup_top1_proposals'])} "
            f"(chance {fmt(summary['chance_top1'])}), "
            f"crpn_recall {fmt(summary['crpn_recall'])}")  # fmt: skip
