"""The ``predet`` command line: argument parsing only; every verb calls its function in
:mod:`predet.commands` with the parsed ``argparse.Namespace``.

Every verb is always listed in ``--help``; its library module is imported when the verb runs (so
``--help`` stays fast and needs no torch), and a dependency it lacks is a one-line error naming the
package, never a verb that silently vanishes. User errors (:class:`predet.errors.UserError`) print one line on stderr and
exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from predet import commands
from predet.errors import Preempted, UserError

# (verb path, its function in predet.commands, one-line help, function adding the verb's arguments)
_Verb = tuple[tuple[str, ...], str, str, Callable[[argparse.ArgumentParser], None]]


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder of the world")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="image side in px (preset's default)")
    p.add_argument("--drop", type=float, default=0.3, help="P(a present class's tags are dropped)")
    p.add_argument("--add", type=float, default=None, help="P(a wrong class's tags are added); default: the preset's (tiny 0.1, small/base 0.05)")
    p.add_argument("--workers", type=int, default=None, help="generator processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world")


def _vocab_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True)
    p.add_argument("--synonyms", required=True, help="JSON {class: [tag, ...]}")
    p.add_argument("--min-images", type=int, default=1, help="drop classes with fewer images")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace OUT/vocab.json and OUT/manifest.jsonl if they exist")


def _queries_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="edgeboxes", choices=["edgeboxes", "selective_search"])
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: cores)")
    p.add_argument("--max-boxes", type=int, default=100, help="top M boxes kept per image")
    p.add_argument("--max-side", type=int, default=500, help="long side for the computation")
    p.add_argument("--min-side", type=int, default=320, help="smaller images are upscaled to it")
    p.add_argument("--shard-size", type=int, default=1000, help="images per cache file")
    p.add_argument("--edge-model", default=None, help="structured-edge model (.yml.gz)")
    p.add_argument("--min-size", type=float, default=0.02, help="min box side / image long side")
    p.add_argument("--max-aspect", type=float, default=4.0, help="max box aspect ratio")
    p.add_argument("--images", default=None, help="image root when --manifest is a COCO JSON")


def _shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True)
    p.add_argument("--queries", default=None, help="query cache folder")
    p.add_argument("--synonyms", default=None, help="tag -> class map (default: beside manifest)")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000)


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None, help="run folder (default: runs/pretrain-<config>)")
    _run_folder_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _run_folder_args(p: argparse.ArgumentParser) -> None:
    """--resume or --overwrite of an existing run folder: one of them, never both."""
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--resume", nargs="?", const=True, default=False, type=_resume_value, metavar="auto",
        help="continue from RUN/checkpoints/last.pt; '--resume auto': continue if RUN holds a "
             "checkpoint, else start (the one command for every (re)start under torchrun or Slurm)",
    )  # fmt: skip
    how.add_argument("--overwrite", action="store_true", help="replace an existing run folder")


def _resume_value(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected 'auto' or nothing, got {text!r}")
    return text


def _resume_last(argv: Sequence[str]) -> list[str]:
    """A bare ``--resume`` moved to the end of ``argv``, so that the optional value it takes
    (``--resume auto``) is never a ``key=value`` override that follows it."""
    argv = list(argv)
    out, bare = [], False
    for i, a in enumerate(argv):
        if a == "--resume" and not (i + 1 < len(argv) and argv[i + 1] == "auto"):
            bare = True
            continue
        out.append(a)
    return out + ["--resume"] if bare else out


def _export_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="pre-training run folder (uses checkpoints/last.pt)")
    src.add_argument("--ckpt", help="checkpoint file")
    p.add_argument("--format", required=True, choices=["torchvision", "detectron2", "timm"])
    p.add_argument("--out", required=True, help="the file to write (timm: a folder)")
    p.add_argument("--box-head", action="store_true", help="also export fc6/fc7 (TwoMLPHead; not for timm)")
    p.add_argument("--norm", choices=["frozenbn", "bn", "syncbn", "gn"], default=None,
                   help="detectron2 only: MODEL.RESNETS.NORM for the config fragment (default: as trained, "
                        "BN as FrozenBN)")


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--init", required=True, help="torchvision-format backbone file, or 'scratch'")
    p.add_argument("--out", default=None)
    _run_folder_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True)
    p.add_argument("--data", default=None, help="annotation JSON (default: the run's val split)")
    p.add_argument("--images", default=None)
    p.add_argument("--ckpt", default=None, help="checkpoint (default: RUN/checkpoints/last.pt)")


def _correlation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", action="append", required=True, metavar="FILE|scratch|RUN",
                   help="torchvision-format backbone file, 'scratch' or a pre-training run; repeat")
    p.add_argument("--data", required=True, help="COCO-format annotation JSON (or LVIS JSON, VOC)")
    p.add_argument("--images", required=True, help="folder the images' file_name are relative to")
    p.add_argument("--out", required=True, help="folder for correlation.json and correlation.png")
    p.add_argument("--max-images", type=int, default=None,
                   help="the first N images with a usable box (default: all)")
    p.add_argument("--boxes-per-gt", type=int, default=50,
                   help="jittered boxes per ground-truth box, even over 10 IoU bins")
    p.add_argument("--seed", type=int, default=0, help="seed of the jittered boxes and of 'scratch'")
    p.add_argument("--size", type=int, default=None,
                   help="resize the shorter side to this (as fine-tuning's test_size); "
                        "default: keep the image size")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--pool", choices=("mean", "flat"), default="mean",
                   help="a box's vector: its RoIAlign 7x7 averaged (default) or flattened")
    p.add_argument("--backbone", default=None,
                   help="scratch's architecture (default: the first file init's, else resnet50)")
    p.add_argument("--fpn-channels", type=int, default=None,
                   help="scratch's FPN width (default: the first file init's, else 256)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small forward passes gain little from more, "
                        "and lose much on a busy CPU)")


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", default=None, help="markdown file (default: compare.md)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "gpu"],
                   help="budget and built-in world (small: the CPU demo; tiny: seconds, for tests; "
                   "gpu: R50-FPN on one GPU)")
    p.add_argument("--world", default=None, metavar="W",
                   help="run the recipe on your world in W (W/pretrain/manifest.jsonl, W/det/train.json, "
                        "W/det/val.json, W/det/images/) instead of the built-in one")
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per init (default: 3)")
    p.add_argument("--pretrain-seeds", type=int, default=1,
                   help="pre-trainings per method, each fine-tuned --seeds times (default: 1)")  # fmt: skip
    p.add_argument("--pretrain", action="append", metavar="KEY=VALUE",
                   help="config override for both pre-trainings, e.g. train.steps=600; repeat")
    p.add_argument("--finetune", action="append", metavar="KEY=VALUE",
                   help="config override for every fine-tuning, e.g. model.test_size=256; repeat")
    p.add_argument("--overwrite", action="store_true")


def _lookup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="pre-training run folder (its config.yaml, data and checkpoint)")
    p.add_argument("--ckpt", default=None, help="checkpoint to use (default: RUN/checkpoints/last.pt)")
    p.add_argument("--out", required=True, help="folder for lookup.json and lookup_NNN.png")
    p.add_argument("--images", type=int, default=32, help="images of the run's data, a seeded draw (default 32)")
    p.add_argument("--pictures", type=int, default=8, help="of which drawn (default 8)")
    p.add_argument("--queries", type=int, default=3, help="queries drawn per picture (default 3)")
    p.add_argument("--seed", type=int, default=0, help="which images")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _bench_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="pre-training config (default: the shipped configs/pretrain/tiny_cpu.yaml)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile N more PreDet steps: time per model part, top operators")
    p.add_argument("--profile-rows", type=int, default=25, metavar="R", help="operators listed (default 25)")
    p.add_argument("--trace", default=None, metavar="FILE", help="with --profile: write a Chrome trace")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _bench_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=32, help="images to time")
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="passes over the images (two-view loader)")
    p.add_argument("--manifest", default=None, help="time these images (default: sample photographs)")


VERBS: list[_Verb] = [
    (("data", "synth"), "data_synth", "generate the built-in synthetic world", _synth_args),
    (("data", "vocab"), "data_vocab", "map tags to classes, filter rare ones", _vocab_args),
    (("data", "queries"), "data_queries", "cache unsupervised query boxes", _queries_args),
    (("data", "shards"), "data_shards", "write WebDataset tar shards", _shards_args),
    (("pretrain",), "pretrain", "PreDet pre-training", _pretrain_args),
    (("export",), "export", "export to torchvision / detectron2 / timm", _export_args),
    (("finetune",), "finetune", "fine-tune a detector", _finetune_args),
    (("evaluate",), "evaluate", "COCO-style AP of a run", _evaluate_args),
    (("analyze", "correlation"), "analyze_correlation", "IoU vs similarity", _correlation_args),
    (("analyze", "lookup"), "analyze_lookup", "query-box lookup: accuracy and pictures", _lookup_args),
    (("compare",), "compare", "markdown table of results", _compare_args),
    (("demo",), "demo", "the PreDet vs cls-only vs scratch comparison, built-in world or --world", _demo_args),
    (("bench", "step"), "bench_step", "PreDet step vs cls-only step", _bench_step_args),
    (("bench", "data"), "bench_data", "query and two-view loader throughput", _bench_data_args),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="predet",
        description="PreDet: weakly supervised pre-training for detection.",
    )
    top = parser.add_subparsers(dest="verb", metavar="<verb>")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, command, help_, add_args in VERBS:
        if len(path) == 1:
            p = top.add_parser(path[0], help=help_, description=help_)
        else:
            if path[0] not in groups:
                g = top.add_parser(path[0], help=f"{path[0]} commands", description=f"predet {path[0]} commands")
                g.set_defaults(_group=g)  # `predet data` alone prints this parser's help
                groups[path[0]] = g.add_subparsers(dest="subverb", metavar="<command>")
            p = groups[path[0]].add_parser(path[1], help=help_, description=help_)
        add_args(p)
        p.set_defaults(_command=command, _verb=" ".join(path), _parser=p)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``parse_args``, except that ``key=value`` overrides may also follow a flag
    (``--config c a=1 --overwrite b=2``): argparse fills a ``nargs="*"`` positional once."""
    args, rest = parser.parse_known_args(_resume_last(sys.argv[1:] if argv is None else argv))
    if rest:
        sub = getattr(args, "_parser", parser)
        extra = [r for r in rest if not r.startswith("-") and "=" in r]
        if len(extra) < len(rest) or not hasattr(args, "overrides"):
            sub.error(f"unrecognized arguments: {' '.join(r for r in rest if r not in extra or not hasattr(args, 'overrides'))}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    command = getattr(args, "_command", None)
    if command is None:
        getattr(args, "_group", parser).print_help(sys.stderr)
        return 2
    try:
        return getattr(commands, command)(args) or 0
    except UserError as e:
        print(f"predet: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # a checkpoint is saved: one line (rank 0), the signal's exit status
        if os.environ.get("RANK", "0") == "0":
            print(f"predet: stopped by {e}", file=sys.stderr, flush=True)
        return e.status
    except KeyboardInterrupt:
        print("predet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
