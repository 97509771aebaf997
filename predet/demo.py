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

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import predet
from predet.errors import UserError

if TYPE_CHECKING:
    from predet.config import FinetuneConfig, PretrainConfig

__all__ = ["DemoPlan", "DemoWorld", "PLANS", "demo", "resolve_world"]

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


def _check_world(root: Path, cfg: PretrainConfig, max_images: int) -> tuple[list, dict]:
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


def _fit_subset(cfg: FinetuneConfig, w: DemoWorld) -> list[str]:
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


def _say_sample(manifest: Path, n: int, max_images: int, cfg: PretrainConfig, *, has_cache: bool) -> None:
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


# Below this mean box AP (0-100) of the best init, every init has learnt next to nothing and the
# ranking says nothing about the inits: a world the plan's fine-tuning is too short for. On a
# 10-class digits-on-photos world, 150 steps gave 0.2-0.4 for every init and 600 steps 2.8-3.2
# (PreDet) against 1.5-1.8 (cls-only); the built-in small world's rows sit at 1.6-3.2.
NEAR_ZERO_AP = 1.0


def _verdict(stats: dict[str, dict], *, finetune_steps: Optional[int] = None) -> str:
    """Whether PreDet's mean box AP beats cls-only's and scratch's by more than the larger std.

    ``stats``: ``summarize``'s ``{init: {"bbox": {"AP": [mean, std]}}}``. When even the best init's
    mean is below ``NEAR_ZERO_AP`` the verdict says so and names the knob instead (more
    fine-tuning steps; ``finetune_steps``: the steps each fine-tune ran, when known).
    """
    ap = {n: stats[n]["bbox"]["AP"] for n in INITS if n in stats}
    if len(ap) < 3 or any(v[0] is None for v in ap.values()):
        return "not every init has a box AP: no verdict"
    best = max(m for m, _ in ap.values())
    if best < NEAR_ZERO_AP:
        more = (f"e.g. --finetune train.steps={4 * finetune_steps}; this run: {finetune_steps}"
                if finetune_steps else "--finetune train.steps=N")  # fmt: skip
        return (
            f"every init ends near zero box AP (best {best:.1f} < {NEAR_ZERO_AP:.1f}): the fine-tuning "
            f"is too short for this world to rank the inits; no verdict (give it more steps, {more})"
        )
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


# --------------------------------------------------------------------------------------------
# The demo as named stages: check the request -> read the world -> (OUT made) world and query
# boxes -> pre-train both methods -> fine-tune every init -> compare -> correlation and lookup
# -> plots -> summary.json
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Request:
    """``demo``'s arguments, checked, with the plan resolved."""

    plan: DemoPlan
    cfgs: Path  # the shipped configs/ folder
    preset: str
    world: Optional[str | Path]  # as given (printed and recorded as given)
    seed: int
    n_seeds: int  # fine-tunes per export
    pretrain_seeds: int
    pretrain_overrides: tuple[str, ...]
    finetune_overrides: tuple[str, ...]

    def pretrain_config(self, items: Sequence[str]) -> PretrainConfig:
        from predet.config import PretrainConfig, load_config

        return load_config(PretrainConfig, self.cfgs / self.plan.pretrain_config, list(items))

    def finetune_config(self, items: Sequence[str]) -> FinetuneConfig:
        from predet.config import FinetuneConfig, load_config

        return load_config(FinetuneConfig, self.cfgs / self.plan.finetune_config, list(items))


@dataclass
class _WorldRead:
    """A ``--world``'s files as read and checked before OUT is made."""

    pcfg: PretrainConfig  # the plan's pre-training config with the user's overrides
    max_images: int  # the data.max_images sample the pre-trainings read
    entries: list  # the manifest's entries
    gts: dict  # {path: loaded COCO dict} of det/train.json and det/val.json
    has_cache: bool  # W/queries holds a query cache

    @property
    def sample(self) -> list[str]:
        return [f"data.max_images={self.max_images}"]


@dataclass
class _Pretrained:
    """What the two pre-training stages leave for the rest."""

    exports: dict[str, list[tuple[str, Path | str]]]  # init -> [(run suffix, init file)]
    pre_runs: dict[str, Path]  # method -> its first pre-training run (curves, lookup)
    cls_map: dict[str, dict[str, float]]  # run name -> its last cls_map / cls_map_true
    widths: list[str]  # model.* overrides giving every detector the pre-trained widths

    @property
    def inits(self) -> dict[str, Path | str]:
        """The first init of each row (what the correlation compares)."""
        return {name: exports[0][1] for name, exports in self.exports.items()}


def _check_request(
    out: str | Path, *, preset: str, world: Optional[str | Path], seed: int, seeds: Optional[int],
    pretrain_seeds: int, pretrain_overrides: Sequence[str], finetune_overrides: Sequence[str],
) -> _Request:  # fmt: skip
    """Every check that needs no world file: preset, seed counts, ``--world`` against ``--out``,
    and each config with the overrides (a typo is an error now, not after a pre-training)."""
    if preset not in PLANS:
        raise UserError(f"demo preset '{preset}' unknown (choose from {', '.join(PLANS)})")
    plan = PLANS[preset]
    n_seeds = plan.seeds if seeds is None else int(seeds)
    if n_seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {n_seeds}")
    if pretrain_seeds < 1:
        raise UserError(f"--pretrain-seeds must be >= 1, got {pretrain_seeds}")
    if world is not None:
        _check_out_apart(out, world)
    from predet.modeling.predet import CLS_ONLY_OVERRIDES

    req = _Request(plan, config_dir(), preset, world, seed, n_seeds, pretrain_seeds,
                   tuple(pretrain_overrides), tuple(finetune_overrides))  # fmt: skip
    for switches in ((), CLS_ONLY_OVERRIDES):
        req.pretrain_config([*plan.pretrain_overrides, *switches, *pretrain_overrides])
    req.finetune_config([*plan.finetune_overrides, *finetune_overrides])
    return req


def _check_out_apart(out: str | Path, world: str | Path) -> None:
    """``--world`` is a folder and ``--out`` neither holds it nor lies in the parts of it the
    demo reads: OUT is made (with --overwrite: emptied) before the world is read."""
    if not Path(world).is_dir():
        raise UserError(f"--world {world}: folder not found")
    w_abs, out_abs = Path(world).resolve(), Path(out).resolve()
    parts = [w_abs / sub for sub in ("pretrain", "det", "queries")]  # what the demo reads of W
    if out_abs == w_abs or out_abs in w_abs.parents or any(out_abs == p or p in out_abs.parents for p in parts):
        raise UserError(f"--out {out} would hold or replace the world {world}; give the demo a folder of its own")


def _read_world(req: _Request) -> Optional[_WorldRead]:
    """A ``--world``'s files read and checked before any compute (an error costs no query pass,
    no pre-training); None for the built-in world."""
    if req.world is None:
        return None
    has_cache = any((Path(req.world) / "queries").glob("queries-*.npz"))
    if not has_cache:
        from predet.data.queries import check_opencv

        check_opencv()  # the query cache will be computed: before OUT is (re)made
    # a --world's pre-training reads what its steps can see (data.max_images)
    pcfg = req.pretrain_config([*req.plan.pretrain_overrides, *req.pretrain_overrides])
    max_images = pcfg.data.max_images or pcfg.train.steps * pcfg.train.batch_size + pcfg.data.heldout
    entries, gts = _check_world(Path(req.world), pcfg, max_images)
    return _WorldRead(pcfg, max_images, entries, gts, has_cache)


def _stage_world(req: _Request, out: Path, clock: _Clock, read: Optional[_WorldRead]) -> DemoWorld:
    """1/6: the world and its query boxes (the built-in world generated on first use)."""
    what = f"world {req.world}" if req.world else f"built-in {req.plan.world!r} world"
    done = clock.stage("world", f"1/6 {what} and its query boxes")
    if read is not None:
        _say_sample(Path(req.world) / "pretrain" / "manifest.jsonl", len(read.entries), read.max_images,
                    read.pcfg, has_cache=read.has_cache)  # fmt: skip
    w = resolve_world(req.world, preset=req.plan.world, seed=req.seed, out=out,
                      query_max_side=req.plan.query_max_side,
                      max_images=read.max_images if read else None,
                      entries=read.entries if read else None)  # fmt: skip
    done()
    return w


def _stage_pretrain(req: _Request, out: Path, clock: _Clock, data: list[str]) -> _Pretrained:
    """2/6: pre-train PreDet and cls-only ``pretrain_seeds`` times each with the same budget
    (``data``: the world's ``data.*`` overrides), export each to torchvision format."""
    from predet.engine.pretrain import pretrain
    from predet.export import export_backbone
    from predet.modeling.predet import CLS_ONLY_OVERRIDES  # the baseline's loss switches

    pre = _Pretrained({n: [] for n in INITS}, {}, {}, [])
    for i, (name, switches) in enumerate((("predet", ()), ("cls-only", CLS_ONLY_OVERRIDES))):
        done = clock.stage(f"pretrain-{name}", f"2/6 pre-train {name} ({i + 1}/2, same budget)")
        for k in range(req.pretrain_seeds):
            tag = "" if k == 0 else f"-p{k}"
            cfg = req.pretrain_config(
                [*data, f"seed={req.seed + k}", *req.plan.pretrain_overrides, *switches, *req.pretrain_overrides]
            )
            run = pretrain(cfg, out / f"pretrain-{name}{tag}")
            path = export_backbone(run / "checkpoints" / "last.pt", "torchvision", out / f"{name}{tag}.pth")[0]
            pre.exports[name].append((tag, path))
            pre.cls_map[f"{name}{tag}"] = _last_eval(run)
            if k == 0:
                pre.pre_runs[name] = run
            if not pre.widths:  # PreDet's first: the methods differ in their loss switches only
                pre.widths = _widths(cfg)
            print(f"    exported {path}; held-out {pre.cls_map[f'{name}{tag}'] or 'cls_map: no held-out slice'}",
                  flush=True)  # fmt: skip
        done()
    pre.exports["scratch"] = [("", "scratch")]
    return pre


def _widths(cfg: PretrainConfig) -> list[str]:
    """Every detector gets the pre-trained widths (the CPU configs use a narrow FPN), scratch too."""
    return [f"model.backbone={cfg.model.backbone}", f"model.fpn_channels={cfg.model.fpn_channels}",
            f"model.box_head_dim={cfg.model.box_head_dim}"]  # fmt: skip


@dataclass
class _FinetuneData:
    """What every fine-tune of the demo shares."""

    det: list[str]  # data.* overrides of the detection set (and a --world's model.* settings)
    subset: list[str]  # ["data.subset=N"] when the world has fewer usable images than the plan's
    cfg: FinetuneConfig  # the config they give (seed 0, plan widths)

    @property
    def arch(self) -> str:
        return {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN", "retinanet": "RetinaNet"}[self.cfg.model.arch]


def _finetune_data(req: _Request, w: DemoWorld, read: Optional[_WorldRead]) -> _FinetuneData:
    """The fine-tunings' detection set, a ``--world``'s settings and a low-shot subset that fits it."""
    det = [
        f"data.train.ann={w.det_train}",
        f"data.train.images={w.det_images}",
        f"data.val.ann={w.det_val}",
        f"data.val.images={w.det_images}",
    ]
    if read is not None:  # a user's world: its det sets, read by _check_world
        det += _world_finetune_overrides(read.gts)
    subset = _fit_subset(req.finetune_config([*det, *req.plan.finetune_overrides, *req.finetune_overrides]), w)
    ft_cfg = req.finetune_config([*det, *req.plan.finetune_overrides, *subset, *req.finetune_overrides])
    if read is not None:
        _say_scale(read.gts[w.det_val], ft_cfg.model.test_size)
    return _FinetuneData(det, subset, ft_cfg)


def _stage_finetune(
    req: _Request, out: Path, clock: _Clock, ft: _FinetuneData, pre: _Pretrained
) -> dict[str, list[Path]]:
    """3/6: fine-tune from every export ``n_seeds`` times (scratch ``n_seeds x pretrain_seeds``);
    returns each init's run folders."""
    from predet.engine.finetune import finetune

    ft_runs: dict[str, list[Path]] = {name: [] for name in INITS}
    for i, name in enumerate(INITS):
        done = clock.stage(
            f"finetune-{name}", f"3/6 fine-tune {ft.arch} from {name} ({i + 1}/3), {req.n_seeds} seed(s)"
        )
        # scratch has no pre-training to repeat: it runs seeds x pretrain_seeds seeds instead
        per_init = req.n_seeds if name != "scratch" else req.n_seeds * req.pretrain_seeds
        for tag, init in pre.exports[name]:
            for s in range(per_init):
                # one low-shot subset (drawn with the demo's seed) for every init and fine-tuning
                # seed: the seeds vary the order, augmentation and head init, not the images
                cfg_ft = req.finetune_config(
                    [*ft.det, *pre.widths, f"seed={req.seed + s}", f"data.subset_seed={req.seed}", f"name={name}",
                     *req.plan.finetune_overrides, *ft.subset, *req.finetune_overrides]
                )  # fmt: skip
                ft_runs[name].append(finetune(cfg_ft, str(init), out / f"finetune-{name}{tag}-s{s}"))
        done()
    return ft_runs


@dataclass
class _Report:
    """The comparison: ``compare.md``'s parts as they are gathered, and what summary.json keeps."""

    table: str
    stats: dict
    verdict: str
    results: dict[str, list[dict]]  # init -> each fine-tune's results.json
    lines: list[str]  # compare.md, in order


def _stage_compare(
    clock: _Clock, ft_runs: dict[str, list[Path]], cls_map: dict[str, dict], finetune_steps: Optional[int]
) -> _Report:
    """4/6: the table (mean ± std per init), the verdict, each seed's AP, the held-out cls_map."""
    from predet.analysis.compare import compare, group_results, summarize

    done = clock.stage("compare", "4/6 compare (mean ± std over fine-tuning seeds)")
    all_runs = [r for name in INITS for r in ft_runs[name]]
    stats = summarize(group_results(all_runs))
    verdict = _verdict(stats, finetune_steps=finetune_steps)
    table = compare(all_runs)
    results = {name: [json.loads((r / "results.json").read_text()) for r in runs] for name, runs in ft_runs.items()}
    lines = [table, f"\n{verdict}\n", _per_seed_lines(results),
             "\nHeld-out classification mAP of the pre-trained heads (last evaluation):\n"]  # fmt: skip
    for name, vals in cls_map.items():
        lines.append(f"- {name}: " + (", ".join(f"{k} {v:.3f}" for k, v in vals.items()) or "no held-out slice") + "\n")
    done()
    return _Report(table, stats, verdict, results, lines)


def _stage_analysis(
    req: _Request, out: Path, clock: _Clock, w: DemoWorld, pre: _Pretrained, ft: _FinetuneData, report: _Report
) -> tuple[dict, Optional[dict]]:
    """5/6: the IoU-similarity correlation of the three inits and PreDet's query-box lookup, added
    to the report, which is then written to ``compare.md``; returns ``(correlation, lookup)``."""
    from predet.analysis.correlation import correlation, format_table, plot_correlation
    from predet.utils import atomic_write_text, write_json

    done = clock.stage("correlation", "5/6 IoU-similarity correlation of the three inits (paper Fig. 5b), "
                       "PreDet's query-box lookup")  # fmt: skip
    corr = correlation(
        {name: str(pre.inits[name]) for name in INITS}, w.det_val, w.det_images,
        seed=req.seed, max_images=req.plan.correlation_images, threads=1,
        # at the fine-tuning's test scale: the features fine-tuning starts from, and bounded time
        # on large photos
        size=ft.cfg.model.test_size, max_size=ft.cfg.model.max_size,
    )  # fmt: skip
    write_json(out / "correlation.json", corr)
    plot_correlation(corr, out / "correlation.png")
    report.lines += ["\nIoU vs cosine similarity of backbone + FPN features, RoIAlign 7x7 averaged per box "
                     "(Pearson / Spearman):\n\n",
                     format_table(corr)]  # fmt: skip
    look = _lookup(pre.pre_runs["predet"], out, req.seed, report.lines)
    atomic_write_text(out / "compare.md", "".join(report.lines))
    print("".join(report.lines), flush=True)
    done()
    return corr, look


def _lookup(run: Path, out: Path, seed: int, lines: list[str]) -> Optional[dict]:
    """The pretext task itself: PreDet's lookup on its own data (``predet analyze lookup``) into
    ``out/lookup``, its summary appended to ``lines``; None when the run has no CROI head."""
    from predet.analysis.lookup import format_summary, lookup, write_lookup
    from predet.config import PretrainConfig, load_config
    from predet.modeling.predet import has_croi_head

    if not has_croi_head(load_config(PretrainConfig, run / "config.yaml").loss):
        # --pretrain loss.info=false loss.croi_reg=false: no CROI head, nothing looks a box up
        lines.append("\nPreDet's query-box lookup: none (its pre-training has no CROI head)\n")
        return None
    look, records, views = lookup(run, images=32, seed=seed)
    write_lookup(out / "lookup", look, records, views, pictures=8)
    lines.append(f"\nPreDet's query-box {format_summary(look)}; pictures in {out / 'lookup'}\n")
    return look


def _stage_plots(out: Path, clock: _Clock, pre: _Pretrained, ft_runs: dict[str, list[Path]], arch: str) -> None:
    """6/6: pre-training and fine-tuning (seed 0) curves."""
    from predet.analysis.plots import plot_curves

    done = clock.stage("plots", "6/6 plots")
    plots = [
        plot_curves(pre.pre_runs, ["loss", "loss_cls", "lookup_top1", "crpn_recall"], out / "pretrain_curves.png",
                    title="pre-training"),
        plot_curves({f"{n}-s0": ft_runs[n][0] for n in INITS}, ["loss", "loss_classifier", "loss_box_reg", "loss_mask"],
                    out / "finetune_curves.png", title=f"{arch} fine-tuning (seed 0)"),
    ]  # fmt: skip
    for p in plots:
        print(f"    {p}", flush=True)
    done()


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
    from predet.utils import prepare_run_dir, write_json

    req = _check_request(out, preset=preset, world=world, seed=seed, seeds=seeds, pretrain_seeds=pretrain_seeds,
                         pretrain_overrides=pretrain_overrides, finetune_overrides=finetune_overrides)  # fmt: skip
    read = _read_world(req)  # every file of a --world, before OUT is made
    out = prepare_run_dir(out, overwrite=overwrite, resumable=False)
    clock, t_start = _Clock(), time.time()
    w = _stage_world(req, out, clock, read)
    data = [f"data.manifest={w.manifest}", f"data.queries={w.queries}", *(read.sample if read else [])]
    pre = _stage_pretrain(req, out, clock, data)
    ft = _finetune_data(req, w, read)
    ft_runs = _stage_finetune(req, out, clock, ft, pre)
    report = _stage_compare(clock, ft_runs, pre.cls_map, ft.cfg.train.steps)
    corr, look = _stage_analysis(req, out, clock, w, pre, ft, report)
    _stage_plots(out, clock, pre, ft_runs, ft.arch)

    summary = {
        "preset": preset, "world": str(world) if world else None, "seed": seed, "seeds": req.n_seeds,
        "pretrain_seeds": pretrain_seeds,
        "minutes": (time.time() - t_start) / 60, "stage_seconds": clock.seconds,
        "stats": report.stats, "verdict": report.verdict, "cls_map": pre.cls_map, "correlation": corr,
        "lookup": look, "results": report.results,
    }  # fmt: skip
    write_json(out / "summary.json", summary)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in clock.seconds.items())
    print(f"\npredet demo: finished in {summary['minutes']:.1f} min ({times}); table in {out / 'compare.md'}",
          flush=True)  # fmt: skip
    return {"table": report.table, "results": report.results, "stats": report.stats, "correlation": corr,
            "cls_map": pre.cls_map}  # fmt: skip
