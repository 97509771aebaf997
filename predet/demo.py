"""``predet demo``: the PreDet comparison on the built-in world or on any DESIGN §6 world.

world (tags + COCO detection set) -> cached query boxes -> pre-train PreDet and a cls-only
baseline with the same budget (each scored on a held-out slice: ``cls_map``) -> export both to
torchvision format -> fine-tune Mask R-CNN from PreDet, cls-only and scratch on a low-shot subset,
``seeds`` times each (same weights, same low-shot subset; the seed draws the order, augmentation
and head init)
-> ``compare.md`` (mean ± std per init), the IoU-similarity correlation of the three inits
(paper Fig. 5b), PreDet's query-box lookup (``lookup/``: accuracy and pictures), curves, and
``summary.json`` with every stage's time.

``--world W`` runs the same recipe on a user's world: ``W/pretrain/manifest.jsonl`` (tags and a
``synonyms.json`` beside it, or labels), ``W/det/train.json``, ``W/det/val.json`` and
``W/det/images/``; a query cache is used from ``W/queries`` when present, else computed into
``OUT/queries``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import predet
from predet.errors import UserError

__all__ = ["DemoPlan", "DemoWorld", "PLANS", "demo", "resolve_world", "run"]

# Loss switches of the cls-only baseline: same backbone + FPN + classification head, no detection losses.
CLS_ONLY = ["loss.crpn=false", "loss.info=false", "loss.croi_reg=false"]
INITS = ("predet", "cls-only", "scratch")


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs for one preset: configs (under ``configs/``), overrides, seeds."""

    pretrain_config: str
    finetune_config: str
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()
    seeds: int = 3  # fine-tuning runs per init
    correlation_images: int = 40  # val images of the correlation analysis
    # long side a --world's query boxes are computed at (QueryParams.max_side): the CPU plans'
    # 64-px views need no more than the built-in 128-px images get (upscaled to 320)
    query_max_side: int = 500
    world: str = "small"  # the built-in world's preset (tiny | small | base), without --world


PLANS = {
    # small: the correlation on every one of the 200 val images (3 medium boxes, ~400 large)
    "small": DemoPlan("pretrain/small_cpu.yaml", "finetune/mask_rcnn_small_cpu.yaml", correlation_images=200,
                      query_max_side=320),
    "tiny": DemoPlan("pretrain/tiny_cpu.yaml", "finetune/mask_rcnn_tiny_cpu.yaml", correlation_images=8,
                     query_max_side=320, world="tiny"),
    # one GPU (bench/transfer_gpu.sh): R50-FPN, ~34 epochs of pre-training at 224 px
    "gpu": DemoPlan("pretrain/r50_fpn_small_gpu.yaml", "finetune/mask_rcnn_r50_small_gpu.yaml",
                    correlation_images=100),
}


@dataclass(frozen=True)
class DemoWorld:
    """The files the recipe reads (DESIGN §6 layout)."""

    manifest: Path
    queries: Path
    det_train: Path
    det_val: Path
    det_images: Path


def config_dir() -> Path:
    """The shipped ``configs/`` folder (beside the package in a source checkout)."""
    here = Path(predet.__file__).resolve().parent
    for cand in (here.parent / "configs", here / "configs"):
        if cand.is_dir():
            return cand
    raise UserError(f"cannot find the shipped configs/ folder next to {here}; run from a source checkout")


@dataclass
class _Clock:
    """Prints stage headers and records each stage's wall time."""

    seconds: dict[str, float] = field(default_factory=dict)

    def stage(self, key: str, title: str):
        t0 = time.time()
        print(f"\n==> {title}", flush=True)

        def done() -> None:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.time() - t0
            print(f"    done in {time.time() - t0:.0f}s", flush=True)

        return done


def _cpus() -> int:
    """CPUs this process may use (its affinity, e.g. a container's share), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_world(
    world: Optional[str | Path],
    *,
    preset: str,
    seed: int,
    out: Path,
    query_max_side: int = 500,
    max_images: Optional[int] = None,
    entries: Optional[list] = None,
) -> DemoWorld:
    """The built-in world of ``preset`` (generated with its query cache on first use), or the
    §6 world at ``world`` (its query cache computed into ``out/queries`` when it has none, at
    ``QueryParams(max_side=query_max_side)``, for the ``data.max_images`` sample of its manifest
    that the pre-training will read: ``max_images`` entries, or all when None). ``entries``: the
    manifest's entries when the caller has already read them."""
    if world is None:
        from predet.data.builtin import ensure_world

        w = ensure_world(preset, seed, root=out / "world")
        return DemoWorld(w.manifest, w.queries, w.det_train, w.det_val, w.det_images)
    root = Path(world)
    files = world_files(root)
    images = root / "det" / "images"
    queries = root / "queries"
    if not any(queries.glob("queries-*.npz")):
        from predet.data.manifest import read_manifest, sample_indices
        from predet.data.queries import QueryParams, cache_queries, check_opencv

        queries = out / "queries"
        entries = entries if entries is not None else read_manifest(files["manifest"]).entries
        entries = [entries[i] for i in sample_indices(len(entries), max_images)]
        params = QueryParams(max_side=query_max_side, min_side=min(QueryParams.min_side, query_max_side))
        print(f"    computing query boxes of {len(entries)} images into {queries} (long side "
              f"{params.max_side} px at most)", flush=True)  # fmt: skip
        check_opencv()
        counts = cache_queries(entries, queries, params, workers=_cpus())
        print(f"    query cache: {counts}", flush=True)
    return DemoWorld(files["manifest"], queries, files["det_train"], files["det_val"], images)


def world_files(root: Path) -> dict[str, Path]:
    """The DESIGN §6 files of the world at ``root`` (``manifest``, ``det_train``, ``det_val``);
    a missing one (or a missing ``det/images/`` folder) is a one-line error naming it."""
    files = {
        "manifest": root / "pretrain" / "manifest.jsonl",
        "det_train": root / "det" / "train.json",
        "det_val": root / "det" / "val.json",
    }
    for path in [root, *files.values()]:
        if not path.exists():
            raise UserError(
                f"--world {root}: {path} not found (expected pretrain/manifest.jsonl, det/train.json, "
                "det/val.json, det/images/)"
            )
    images = root / "det" / "images"
    if not images.is_dir():
        raise UserError(f"--world {root}: {images} is not a folder of detection images")
    return files


def _check_world(root: Path, cfg: "PretrainConfig", max_images: int) -> tuple[list, dict]:  # noqa: F821
    """Read and check a world's files before any compute: its layout, the pre-training manifest
    (and the classes its ``max_images`` sample gives: tags need a synonyms file) and both detection
    files. Returns the manifest's entries and ``{path: loaded COCO dict}`` of the detection files."""
    from predet.data.datasets import manifest_vocab
    from predet.data.detection import load_coco_json
    from predet.data.manifest import read_manifest, sample_indices

    files = world_files(root)
    entries = read_manifest(files["manifest"]).entries
    manifest_vocab(cfg, files["manifest"], [entries[i] for i in sample_indices(len(entries), max_images)])
    gts = {p: load_coco_json(p) for p in (files["det_train"], files["det_val"])}
    return entries, gts


def _fit_subset(cfg: "FinetuneConfig", w: DemoWorld) -> list[str]:  # noqa: F821
    """``["data.subset=N"]`` when the plan's low-shot subset is larger than the world's usable
    training set (a small ``--world``: fine-tune on all of it, and say so), else ``[]``."""
    if cfg.data.subset is None:
        return []
    from predet.data.detection import DetectionDataset, load_gt

    usable = len(DetectionDataset(load_gt(cfg.data.format, w.det_train), w.det_images, train=True))
    if usable >= cfg.data.subset:
        return []
    if usable == 0:
        raise UserError(f"{w.det_train}: no training image has a usable box")
    print(f"    low-shot subset: {w.det_train} has {usable} usable training images, fewer than the "
          f"plan's {cfg.data.subset}: fine-tuning on all {usable}", flush=True)  # fmt: skip
    return [f"data.subset={usable}"]


def _world_finetune_overrides(gts: dict[Path, dict]) -> list[str]:
    """Fine-tuning settings a user's world (``gts``: its loaded ``det/train.json`` and
    ``det/val.json`` by path) needs beyond the plan's:

    - ``model.arch=faster_rcnn`` when an annotation of ``det/train.json`` or ``det/val.json`` has
      no mask (a box-only set): the comparison is then in box AP only;
    - ``model.detections_per_img=100`` (COCO's evaluation limit): the CPU plans' 10-20 are
      for the built-in scenes of 1-3 objects.
    """
    from predet.data.detection import missing_segmentation

    out = ["model.detections_per_img=100"]
    missing = {p.name: missing_segmentation(gt) for p, gt in gts.items()}
    if any(missing.values()):
        where = ", ".join(f"{n}: {k}" for n, k in missing.items() if k)
        print(f"    box-only annotations ({where} without a mask): fine-tuning Faster R-CNN, box AP only",
              flush=True)  # fmt: skip
        out.append("model.arch=faster_rcnn")
    return out


def _say_sample(manifest: Path, n: int, max_images: int, cfg: "PretrainConfig", *, has_cache: bool) -> None:  # noqa: F821
    """Print that the pre-training reads a ``data.max_images`` sample of a manifest of ``n``
    images, when it is larger."""
    from predet.data.heldout import heldout_indices

    if n > max_images:
        held = len(heldout_indices(max_images, cfg.data.heldout))
        queries = "" if has_cache else " and query boxes are computed for those only"
        print(f"    {manifest} has {n} images; the pre-trainings see {cfg.train.steps} x "
              f"{cfg.train.batch_size} = {cfg.train.steps * cfg.train.batch_size} of them: they read a "
              f"fixed sample of {max_images} ({held} held out){queries} (--pretrain data.max_images=N "
              "to change)", flush=True)  # fmt: skip


def _say_scale(val_gt: dict, test_size: int) -> None:
    """Print how much the plan's fine-tuning scale shrinks the world's detection images."""
    import statistics

    sides = [min(im["width"], im["height"]) for im in val_gt["images"] if "width" in im]
    if not sides:
        return
    median = statistics.median(sides)
    line = f"    detection images: median short side {median:.0f} px, fine-tuned at {test_size} px"
    if median > 1.5 * test_size:
        line += (f" (objects {median / test_size:.1f}x smaller than in the files: the CPU plan's "
                 "budget; e.g. --finetune model.test_size=256 --finetune model.max_size=512 "
                 "--finetune 'model.train_sizes=[224,256,288]' to fine-tune larger)")  # fmt: skip
    print(line, flush=True)


def _per_seed_lines(results: dict[str, list[dict]]) -> str:
    """Each init's box / mask AP seed by seed (what the mean ± std of the table summarise)."""
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    out = ["\nPer fine-tuning seed (AP^bb / AP^mk):\n"]
    for name, runs in results.items():
        cells = [f"{fmt(r.get('bbox', {}).get('AP'))}/{fmt(r.get('segm', {}).get('AP'))}" for r in runs]
        out.append(f"- {name}: {'  '.join(cells)}\n")
    return "".join(out)


def _last_eval(run: Path) -> dict[str, float]:
    """The last ``cls_map`` / ``cls_map_true`` a pre-training run logged."""
    out: dict[str, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.update({k: row[k] for k in ("cls_map", "cls_map_true") if k in row})
    return out


def _verdict(stats: dict[str, dict]) -> str:
    """Whether PreDet's mean box AP beats cls-only's and scratch's by more than the larger std."""
    ap = {n: stats[n]["bbox"]["AP"] for n in INITS if n in stats}
    if len(ap) < 3 or any(v[0] is None for v in ap.values()):
        return "not every init has a box AP: no verdict"
    if any(sd is None for _, sd in ap.values()):  # one fine-tune of an init: its noise is unmeasured
        return "an init has one fine-tune with a box AP: no verdict on noise (use --seeds 2 or more)"
    (p, p_sd), others = ap["predet"], [ap["cls-only"], ap["scratch"]]
    margin = min(p - m for m, _ in others)
    noise = max(sd for _, sd in [ap["predet"], *others])
    ok = margin > noise
    return (
        f"PreDet box AP {p:.1f} ± {p_sd:.1f}: {margin:+.1f} over the better of cls-only/scratch, "
        f"largest std {noise:.1f} -> {'beyond' if ok else 'NOT beyond'} noise"
    )


def demo(
    out: str | Path,
    *,
    preset: str = "small",
    world: Optional[str | Path] = None,
    seed: int = 0,
    seeds: Optional[int] = None,
    pretrain_seeds: int = 1,
    overwrite: bool = False,
    pretrain_overrides: Sequence[str] = (),
    finetune_overrides: Sequence[str] = (),
) -> dict:
    """Run the demo into ``out``; returns ``{"table", "results", "stats", "correlation", "cls_map"}``.

    ``pretrain_overrides`` / ``finetune_overrides`` are extra ``key=value`` items applied to every
    run of that kind (the tests use them to shrink the budget); ``seeds`` overrides the plan's
    number of fine-tuning seeds. ``pretrain_seeds`` > 1 pre-trains PreDet and cls-only that many
    times (seeds ``seed``, ``seed + 1``, ...; the extra runs and exports get a ``-p<k>`` suffix) and
    fine-tunes each export ``seeds`` times, so that a row's mean ± std covers the pre-training's
    own variance too (scratch runs ``seeds x pretrain_seeds`` seeds).
    """
    from predet.analysis.compare import compare, group_results, summarize
    from predet.analysis.correlation import correlation, format_table, plot_correlation
    from predet.analysis.lookup import format_summary, lookup, write_lookup
    from predet.modeling.predet import has_croi_head
    from predet.analysis.plots import plot_curves
    from predet.config import FinetuneConfig, PretrainConfig, load_config
    from predet.engine.finetune import finetune
    from predet.engine.pretrain import pretrain
    from predet.export import export_backbone
    from predet.utils import atomic_write_text, prepare_run_dir, write_json

    if preset not in PLANS:
        raise UserError(f"demo preset '{preset}' unknown (choose from {', '.join(PLANS)})")
    plan, cfgs = PLANS[preset], config_dir()
    n_seeds = plan.seeds if seeds is None else int(seeds)
    if n_seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {n_seeds}")
    if pretrain_seeds < 1:
        raise UserError(f"--pretrain-seeds must be >= 1, got {pretrain_seeds}")
    if world is not None and not Path(world).is_dir():
        raise UserError(f"--world {world}: folder not found")
    if world is not None:  # OUT is made (with --overwrite: emptied) before the world is read
        w_abs, out_abs = Path(world).resolve(), Path(out).resolve()
        parts = [w_abs / sub for sub in ("pretrain", "det", "queries")]  # what the demo reads of W
        if out_abs == w_abs or out_abs in w_abs.parents or any(out_abs == p or p in out_abs.parents for p in parts):
            raise UserError(f"--out {out} would hold or replace the world {world}; give the demo a folder of its own")
    # a typo in an override is an error now, not after the world and a pre-training
    for switches in ([], CLS_ONLY):
        load_config(PretrainConfig, cfgs / plan.pretrain_config,
                    [*plan.pretrain_overrides, *switches, *pretrain_overrides])  # fmt: skip
    load_config(FinetuneConfig, cfgs / plan.finetune_config, [*plan.finetune_overrides, *finetune_overrides])
    has_cache = world is not None and any((Path(world) / "queries").glob("queries-*.npz"))
    if world is not None and not has_cache:
        from predet.data.queries import check_opencv

        check_opencv()  # the query cache will be computed: before OUT is (re)made
    sample = []  # a --world's pre-training reads what its steps can see (data.max_images)
    entries, gts = None, {}
    if world is not None:
        pcfg = load_config(PretrainConfig, cfgs / plan.pretrain_config, [*plan.pretrain_overrides, *pretrain_overrides])
        max_images = pcfg.data.max_images or pcfg.train.steps * pcfg.train.batch_size + pcfg.data.heldout
        sample = [f"data.max_images={max_images}"]
        # every file of the world read and checked now: an error costs no query pass, no pre-training
        entries, gts = _check_world(Path(world), pcfg, max_images)
    out = prepare_run_dir(out, overwrite=overwrite, resumable=False)
    clock, t_start = _Clock(), time.time()

    done = clock.stage("world", f"1/6 {'world ' + str(world) if world else f'built-in {plan.world!r} world'} and its query boxes")
    if sample:
        _say_sample(Path(world) / "pretrain" / "manifest.jsonl", len(entries), max_images, pcfg, has_cache=has_cache)
    w = resolve_world(world, preset=plan.world, seed=seed, out=out, query_max_side=plan.query_max_side,
                      max_images=max_images if sample else None, entries=entries)  # fmt: skip
    done()

    data = [f"data.manifest={w.manifest}", f"data.queries={w.queries}", *sample]
    inits: dict[str, Path | str] = {}  # the first pre-training of each method (correlation)
    exports: dict[str, list[tuple[str, Path | str]]] = {n: [] for n in INITS}  # (suffix, init)
    pre_runs: dict[str, Path] = {}
    cls_map: dict[str, dict[str, float]] = {}
    for i, (name, switches) in enumerate((("predet", []), ("cls-only", CLS_ONLY))):
        done = clock.stage(f"pretrain-{name}", f"2/6 pre-train {name} ({i + 1}/2, same budget)")
        for k in range(pretrain_seeds):
            tag = "" if k == 0 else f"-p{k}"
            cfg = load_config(
                PretrainConfig,
                cfgs / plan.pretrain_config,
                [*data, f"seed={seed + k}", *plan.pretrain_overrides, *switches, *pretrain_overrides],
            )
            run = pretrain(cfg, out / f"pretrain-{name}{tag}")
            path = export_backbone(run / "checkpoints" / "last.pt", "torchvision", out / f"{name}{tag}.pth")[0]
            exports[name].append((tag, path))
            cls_map[f"{name}{tag}"] = _last_eval(run)
            if k == 0:
                pre_runs[name], inits[name] = run, path
            print(f"    exported {path}; held-out {cls_map[f'{name}{tag}'] or 'cls_map: no held-out slice'}",
                  flush=True)  # fmt: skip
        done()
    inits["scratch"] = "scratch"
    exports["scratch"] = [("", "scratch")]

    det = [
        f"data.train.ann={w.det_train}",
        f"data.train.images={w.det_images}",
        f"data.val.ann={w.det_val}",
        f"data.val.images={w.det_images}",
    ]
    # every detector gets the pre-trained widths (the CPU configs use a narrow FPN), scratch included
    widths = [f"model.backbone={cfg.model.backbone}", f"model.fpn_channels={cfg.model.fpn_channels}",
              f"model.box_head_dim={cfg.model.box_head_dim}"]  # fmt: skip
    if world is not None:  # a user's world: its det sets, read by _check_world
        det += _world_finetune_overrides(gts)
    subset = _fit_subset(
        load_config(FinetuneConfig, cfgs / plan.finetune_config, [*det, *plan.finetune_overrides, *finetune_overrides]),
        w,
    )  # fmt: skip
    ft_cfg = load_config(FinetuneConfig, cfgs / plan.finetune_config,
                         [*det, *plan.finetune_overrides, *subset, *finetune_overrides])  # fmt: skip
    arch = {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN", "retinanet": "RetinaNet"}[ft_cfg.model.arch]
    if world is not None:
        _say_scale(gts[w.det_val], ft_cfg.model.test_size)
    ft_runs: dict[str, list[Path]] = {name: [] for name in INITS}
    for i, name in enumerate(INITS):
        done = clock.stage(
            f"finetune-{name}", f"3/6 fine-tune {arch} from {name} ({i + 1}/3), {n_seeds} seed(s)"
        )
        # scratch has no pre-training to repeat: it runs seeds x pretrain_seeds seeds instead
        per_init = n_seeds if name != "scratch" else n_seeds * pretrain_seeds
        for tag, init in exports[name]:
            for s in range(per_init):
                cfg_ft = load_config(
                    FinetuneConfig,
                    cfgs / plan.finetune_config,
                    # one low-shot subset (drawn with the demo's seed) for every init and fine-tuning
                    # seed: the seeds vary the order, augmentation and head init, not the images
                    [*det, *widths, f"seed={seed + s}", f"data.subset_seed={seed}", f"name={name}",
                     *plan.finetune_overrides, *subset, *finetune_overrides],
                )  # fmt: skip
                ft_runs[name].append(finetune(cfg_ft, str(init), out / f"finetune-{name}{tag}-s{s}"))
        done()

    done = clock.stage("compare", "4/6 compare (mean ± std over fine-tuning seeds)")
    all_runs = [r for name in INITS for r in ft_runs[name]]
    stats = summarize(group_results(all_runs))
    verdict = _verdict(stats)
    table = compare(all_runs)
    results = {name: [json.loads((r / "results.json").read_text()) for r in runs] for name, runs in ft_runs.items()}
    lines = [table, f"\n{verdict}\n", _per_seed_lines(results),
             "\nHeld-out classification mAP of the pre-trained heads (last evaluation):\n"]  # fmt: skip
    for name, vals in cls_map.items():
        lines.append(f"- {name}: " + (", ".join(f"{k} {v:.3f}" for k, v in vals.items()) or "no held-out slice") + "\n")
    done()

    done = clock.stage("correlation", "5/6 IoU-similarity correlation of the three inits (paper Fig. 5b), "
                       "PreDet's query-box lookup")
    corr = correlation(
        {name: str(inits[name]) for name in INITS}, w.det_val, w.det_images,
        seed=seed, max_images=plan.correlation_images, threads=1,
        # at the fine-tuning's test scale: the features fine-tuning starts from, and bounded time
        # on large photos
        size=ft_cfg.model.test_size, max_size=ft_cfg.model.max_size,
    )  # fmt: skip
    write_json(out / "correlation.json", corr)
    plot_correlation(corr, out / "correlation.png")
    lines += ["\nIoU vs cosine similarity of backbone + FPN features, RoIAlign 7x7 averaged per box "
              "(Pearson / Spearman):\n\n",
              format_table(corr)]  # fmt: skip
    # the pretext task itself: PreDet's lookup on its own data (predet analyze lookup)
    look = None
    pre_cfg = load_config(PretrainConfig, pre_runs["predet"] / "config.yaml")
    if has_croi_head(pre_cfg.loss):
        look, records, views = lookup(pre_runs["predet"], images=32, seed=seed)
        write_lookup(out / "lookup", look, records, views, pictures=8)
        lines.append(f"\nPreDet's query-box {format_summary(look)}; pictures in {out / 'lookup'}\n")
    else:  # --pretrain loss.info=false loss.croi_reg=false: no CROI head, nothing looks a box up
        lines.append("\nPreDet's query-box lookup: none (its pre-training has no CROI head)\n")
    atomic_write_text(out / "compare.md", "".join(lines))
    print("".join(lines), flush=True)
    done()

    done = clock.stage("plots", "6/6 plots")
    plots = [
        plot_curves(pre_runs, ["loss", "loss_cls", "lookup_top1", "crpn_recall"], out / "pretrain_curves.png",
                    title="pre-training"),
        plot_curves({f"{n}-s0": ft_runs[n][0] for n in INITS}, ["loss", "loss_classifier", "loss_box_reg", "loss_mask"],
                    out / "finetune_curves.png", title=f"{arch} fine-tuning (seed 0)"),
    ]  # fmt: skip
    for p in plots:
        print(f"    {p}", flush=True)
    done()

    summary = {
        "preset": preset, "world": str(world) if world else None, "seed": seed, "seeds": n_seeds,
        "pretrain_seeds": pretrain_seeds,
        "minutes": (time.time() - t_start) / 60, "stage_seconds": clock.seconds,
        "stats": stats, "verdict": verdict, "cls_map": cls_map, "correlation": corr, "lookup": look,
        "results": results,
    }  # fmt: skip
    write_json(out / "summary.json", summary)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in clock.seconds.items())
    print(f"\npredet demo: finished in {summary['minutes']:.1f} min ({times}); table in {out / 'compare.md'}",
          flush=True)  # fmt: skip
    return {"table": table, "results": results, "stats": stats, "correlation": corr, "cls_map": cls_map}


def run(args: argparse.Namespace) -> int:
    demo(args.out, preset=args.preset, world=args.world, seeds=args.seeds, pretrain_seeds=args.pretrain_seeds,
         overwrite=args.overwrite, pretrain_overrides=args.pretrain or (),
         finetune_overrides=args.finetune or ())  # fmt: skip
    return 0
