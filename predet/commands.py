"""The verbs of the ``predet`` command line: one function per verb, from parsed flags to a library call.

:mod:`predet.cli` parses the arguments and calls one of these with the ``argparse.Namespace``;
each function checks what only the flags can get wrong, calls the library's typed functions and
prints what the verb reports. The library modules are imported inside the functions, so that
``predet --help`` stays fast and needs no torch; a third-party package a verb's module lacks is a
one-line error naming it (:func:`_needs`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

from predet.errors import UserError

# import name -> what to install, for the error of a verb whose dependency is missing
_PACKAGES = {"cv2": "opencv-contrib-python-headless", "skimage": "scikit-image"}


@contextlib.contextmanager
def _needs(args: argparse.Namespace) -> Iterator[None]:
    """Around a verb's import of its library module: a third-party package the module lacks is a
    UserError naming the package."""
    try:
        yield
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "predet":
            raise  # a module of this package is missing: a bug (or a broken install), not usage
        package = _PACKAGES.get(e.name.split(".")[0], e.name.split(".")[0])
        raise UserError(
            f"'predet {args._verb}' needs the Python package '{e.name}', which is not installed "
            f"(pip install {package})"
        ) from None


def data_synth(args: argparse.Namespace) -> int:
    """``predet data synth``: generate the world, print one summary line."""
    with _needs(args):
        from predet.data.synth import generate_world
    summary = generate_world(
        args.out, args.preset, args.seed, size=args.size, drop=args.drop, add=args.add, workers=args.workers,
        overwrite=args.overwrite, progress=sys.stderr.isatty(),
    )  # fmt: skip
    c, m = summary["counts"], summary["measured"]
    print(
        f"wrote {summary['out']}: {len(summary['classes'])} classes, "
        f"{c['pretrain']} pre-training images (tags: measured drop {m['drop']:.3f}, "
        f"add {m['add']:.3f}), detection {c['det_train']} train / {c['det_val']} val, "
        f"in {summary['seconds']:.1f} s"
    )
    return 0


def data_vocab(args: argparse.Namespace) -> int:
    """``predet data vocab``: classes and the labelled manifest (:func:`predet.data.vocab.write_vocab`)."""
    with _needs(args):
        from predet.data.vocab import write_vocab
    r = write_vocab(args.manifest, args.synonyms, args.out, min_images=args.min_images, overwrite=args.overwrite)
    vocab, out = r["vocab"], Path(args.out)
    top = ", ".join(f"{t} ({c})" for t, c in list(vocab.unknown_tags.items())[:8])
    print(f"images: {r['read']} read, {r['kept']} kept, {r['no_class']} with no class left")
    if r["repeats"]:  # counted once per class; kept in the manifest as given (trained on as often)
        print(f"repeated images: {r['repeats']} lines name an image of an earlier line (first: line "
              f"{r['repeat_line']} repeats line {r['repeat_first']}); each counts once towards --min-images")  # fmt: skip
    print(f"classes: {len(vocab.classes)} kept, {len(vocab.dropped)} dropped (< {args.min_images} images)")
    shown = "" if len(vocab.unknown_tags) <= 8 else " (the 8 most frequent)"
    print(f"tags never seen in the synonyms: {len(vocab.unknown_tags)} distinct" + (f"{shown}: {top}" if top else ""))
    print(f"wrote {out / 'vocab.json'} and {out / 'manifest.jsonl'}")
    return 0


def data_queries(args: argparse.Namespace) -> int:
    """``predet data queries``: the query box cache (:func:`predet.data.queries.query_manifest`)."""
    with _needs(args):
        from predet.data.manifest import read_manifest
        from predet.data.queries import QueryParams, check_opencv, query_manifest
    manifest = read_manifest(args.manifest, args.images)
    if args.max_boxes < 1 or args.max_side < 32 or args.shard_size < 1:
        raise UserError("--max-boxes and --shard-size must be >= 1 and --max-side >= 32")
    if args.edge_model and not Path(args.edge_model).is_file():
        raise UserError(f"--edge-model file not found: {args.edge_model}")
    params = QueryParams(
        method=args.method, max_boxes=args.max_boxes, max_side=args.max_side,
        min_side=min(args.min_side, args.max_side), min_size=args.min_size, max_aspect=args.max_aspect,
        edge_model=args.edge_model,
    )  # fmt: skip
    check_opencv()
    query_manifest(manifest, args.out, params, workers=args.workers, shard_size=args.shard_size)
    return 0


def data_shards(args: argparse.Namespace) -> int:
    """``predet data shards``: WebDataset shards (:func:`predet.data.shards.shard_manifest`)."""
    with _needs(args):
        from predet.data.shards import shard_manifest
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    shard_manifest(args.manifest, args.out, queries=args.queries, synonyms=args.synonyms, shard_size=args.shard_size)
    return 0


def pretrain(args: argparse.Namespace) -> int:
    """``predet pretrain``: the config and its overrides, the run folder, then pre-training."""
    with _needs(args):
        from predet.config import PretrainConfig, load_config
        from predet.engine.pretrain import pretrain as run_pretrain
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"pretrain-{Path(args.config).stem}"
    run_pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite)
    return 0


def export(args: argparse.Namespace) -> int:
    """``predet export``: the written files, and how to use them."""
    with _needs(args):
        import yaml

        from predet import export_timm
        from predet.export import export_backbone, train_net_command
    src = Path(args.run) / "checkpoints" / "last.pt" if args.run else Path(args.ckpt)
    written = export_backbone(src, args.format, args.out, box_head=args.box_head, norm=args.norm)
    for path in written:
        print(path)
    if args.format == "detectron2":
        print(f"# detectron2, from its repository root (the keys of {written[-1]} over the stock config):")
        print(train_net_command(yaml.safe_load(Path(written[-1]).read_text())))
    if args.format == "timm":
        meta = json.loads(written[-1].read_text())["predet"]
        print("\n".join(export_timm.usage_lines(meta, written[0].parent)))
    return 0


def finetune(args: argparse.Namespace) -> int:
    """``predet finetune``: the config, the --init file, the run folder, then fine-tuning."""
    with _needs(args):
        from predet import distributed
        from predet.config import FinetuneConfig, load_config
        from predet.engine.finetune import default_run_folder
        from predet.engine.finetune import finetune as run_finetune
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    if args.init != "scratch" and Path(args.init).is_dir():
        hint = (f": export it first, e.g. `predet export --run {args.init} --format torchvision --out "
                f"{Path(args.init) / 'backbone.pth'}`") if (Path(args.init) / "checkpoints").is_dir() else ""
        raise UserError(f"--init: {args.init} is a folder, not a backbone file{hint}")
    if args.init != "scratch" and not Path(args.init).is_file():
        raise UserError(f"--init: file not found: {args.init} (or pass 'scratch')")
    out = Path(args.out) if args.out else default_run_folder(args.config, args.init)
    try:
        run_finetune(cfg, args.init, out, resume=args.resume, overwrite=args.overwrite)
    finally:
        distributed.cleanup()
    if distributed.is_main():
        print(f"run folder: {out}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``predet evaluate``: AP of a run, printed and written to RUN/results.json (rank 0 only)."""
    with _needs(args):
        from predet import distributed
        from predet.engine.evaluate import evaluate_run, format_results
    if distributed.rank() != 0:
        return 0
    results = evaluate_run(args.run, args.data, args.images, ckpt=args.ckpt)
    print(format_results(results))
    print(f"wrote {Path(args.run) / 'results.json'} and predictions.json")
    return 0


def analyze_correlation(args: argparse.Namespace) -> int:
    """``predet analyze correlation``: IoU vs similarity of each --init, table and plot."""
    with _needs(args):
        from predet.analysis.correlation import (
            correlation,
            format_table,
            init_name,
            save_correlation,
        )
    t0 = time.time()
    inits: dict[str, str] = {}
    for init in args.init:
        name = init_name(init)
        if name in inits:
            raise UserError(f"--init {init}: another init is also named '{name}' (rename one file)")
        inits[name] = init
    if args.size is not None and args.size < 1:
        raise UserError(f"--size {args.size}: must be positive")
    from predet.engine.common import resolve_device

    device = resolve_device(args.device, what="--device")
    results = correlation(
        inits, args.data, args.images, seed=args.seed, boxes_per_gt=args.boxes_per_gt, max_images=args.max_images,
        size=args.size, batch_size=args.batch_size, backbone=args.backbone, fpn_channels=args.fpn_channels,
        device=device, threads=args.threads, pool=args.pool,
    )  # fmt: skip
    out = Path(args.out)
    save_correlation(results, out)
    print(format_table(results))
    print(f"wrote {out / 'correlation.json'} and {out / 'correlation.png'} in {time.time() - t0:.1f}s")
    return 0


def analyze_lookup(args: argparse.Namespace) -> int:
    """``predet analyze lookup``: query-box lookup accuracy and pictures of a pre-training run."""
    with _needs(args):
        import torch

        from predet.analysis.lookup import format_summary, lookup, write_lookup
        from predet.engine.common import resolve_device
    t0 = time.time()
    if args.pictures < 0 or args.queries < 1:  # before the work, as write_lookup would say after it
        raise UserError(f"--pictures {args.pictures} / --queries {args.queries}: must be >= 0 / >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, what="--device")
    summary, records, views = lookup(
        args.run, ckpt=args.ckpt, images=args.images, seed=args.seed, batch_size=args.batch_size, device=device
    )
    drawn = write_lookup(args.out, summary, records, views, pictures=args.pictures, queries=args.queries)
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'lookup.json'} and {drawn} pictures in {time.time() - t0:.1f}s")
    return 0


def compare(args: argparse.Namespace) -> int:
    """``predet compare``: the markdown table of the runs, printed and written to --out."""
    with _needs(args):
        from predet.analysis.compare import write_compare
    out = Path(args.out or "compare.md")
    table = write_compare(args.runs, out)
    print(table, end="")
    print(f"wrote {out}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """``predet demo``: the PreDet vs cls-only vs scratch comparison (:func:`predet.demo.demo`)."""
    with _needs(args):
        from predet.demo import demo as run_demo
    run_demo(args.out, preset=args.preset, world=args.world, seeds=args.seeds, pretrain_seeds=args.pretrain_seeds,
             overwrite=args.overwrite, pretrain_overrides=args.pretrain or (),
             finetune_overrides=args.finetune or ())  # fmt: skip
    return 0


def bench_step(args: argparse.Namespace) -> int:
    """``predet bench step``: PreDet step vs cls-only step (:func:`predet.bench.bench_step`)."""
    with _needs(args):
        from predet.bench import bench_step as run_bench_step
        from predet.config import PretrainConfig, load_config
    if args.config is None:  # the shipped tiny config, wherever the command runs from
        from predet.demo import config_dir

        args.config = str(config_dir() / "pretrain" / "tiny_cpu.yaml")
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if args.iters < 1:
        raise UserError(f"--iters: must be >= 1, got {args.iters}")
    if args.profile < 0:
        raise UserError(f"--profile: must be >= 0 steps, got {args.profile}")
    if args.trace and not args.profile:
        raise UserError("--trace: needs --profile N (the profiled steps are what it records)")
    run_bench_step(cfg, iters=args.iters, warmup=args.warmup, profile=args.profile, profile_rows=args.profile_rows,
                   trace=args.trace)  # fmt: skip
    return 0


def bench_data(args: argparse.Namespace) -> int:
    """``predet bench data``: query and two-view loader throughput (:func:`predet.data.bench.bench_data`)."""
    with _needs(args):
        from predet.data.bench import bench_data as run_bench_data
    if args.images < 1 or args.repeats < 1:
        raise UserError(f"--images and --repeats must be >= 1, got {args.images} and {args.repeats}")
    from predet.config import MIN_INPUT_SIZE

    if args.size < MIN_INPUT_SIZE:  # before the query benchmark, not after it
        raise UserError(f"--size {args.size}: views must be >= {MIN_INPUT_SIZE} px")
    run_bench_data(args.images, args.size, repeats=args.repeats, manifest=args.manifest)
    return 0
