"""``predet demo``: the whole PreDet pipeline on the built-in synthetic world.

world (tags only + COCO detection set) -> cached query boxes -> pre-train PreDet and a cls-only
baseline with the same budget -> export both to torchvision format -> fine-tune Mask R-CNN from
PreDet, cls-only and scratch with the same schedule on a low-shot subset -> evaluate -> a
comparison table, loss curves and the numbers as measured, all under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import predet
from predet.errors import UserError

# Loss switches of the cls-only baseline: same backbone + FPN + classification head, no detection losses.
CLS_ONLY = ["loss.crpn=false", "loss.info=false", "loss.croi_reg=false"]


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs for one preset: configs (under ``configs/``) and their overrides."""

    pretrain_config: str
    finetune_config: str
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()


PLANS = {
    "small": DemoPlan("pretrain/small_cpu.yaml", "finetune/mask_rcnn_small_cpu.yaml"),
    "tiny": DemoPlan("pretrain/tiny_cpu.yaml", "finetune/mask_rcnn_tiny_cpu.yaml"),
}


def config_dir() -> Path:
    """The shipped ``configs/`` folder (beside the package in a source checkout)."""
    here = Path(predet.__file__).resolve().parent
    for cand in (here.parent / "configs", here / "configs"):
        if cand.is_dir():
            return cand
    raise UserError(f"cannot find the shipped configs/ folder next to {here}; run from a source checkout")


def _stage(title: str) -> Callable[[], None]:
    """Print a stage header now; the returned function prints its wall time."""
    t0 = time.time()
    print(f"\n==> {title}", flush=True)
    return lambda: print(f"    done in {time.time() - t0:.0f}s", flush=True)


def demo(
    out: str | Path,
    *,
    preset: str = "small",
    seed: int = 0,
    overwrite: bool = False,
    pretrain_overrides: Sequence[str] = (),
    finetune_overrides: Sequence[str] = (),
) -> dict:
    """Run the demo into ``out``; returns ``{"table": markdown, "results": {name: results}}``.

    ``pretrain_overrides`` / ``finetune_overrides`` are extra ``key=value`` items applied to every
    run of that kind (the tests use them to shrink the budget).
    """
    from predet.analysis.compare import compare
    from predet.analysis.plots import plot_curves
    from predet.config import FinetuneConfig, PretrainConfig, load_config
    from predet.data.builtin import ensure_world
    from predet.engine.finetune import finetune
    from predet.engine.pretrain import pretrain
    from predet.export import export_backbone
    from predet.utils import prepare_run_dir

    if preset not in PLANS:
        raise UserError(f"demo preset '{preset}' unknown (choose from {', '.join(PLANS)})")
    plan, cfgs = PLANS[preset], config_dir()
    out = prepare_run_dir(out, overwrite=overwrite)
    t_start = time.time()

    done = _stage(f"1/5 built-in '{preset}' world and its query-box cache")
    world = ensure_world(preset, seed, root=out / "world")
    meta = json.loads((world.root / "pretrain" / "meta.json").read_text())
    print(f"    {world.root}: {meta['counts']}", flush=True)
    done()

    data = [f"data.manifest={world.manifest}", f"data.queries={world.queries}", f"seed={seed}"]
    inits: dict[str, Path | str] = {"scratch": "scratch"}
    pre_runs: dict[str, Path] = {}
    for i, (name, switches) in enumerate((("predet", []), ("cls-only", CLS_ONLY))):
        done = _stage(f"2/5 pre-train {name} ({i + 1}/2, same budget)")
        cfg = load_config(
            PretrainConfig,
            cfgs / plan.pretrain_config,
            [*data, *plan.pretrain_overrides, *switches, *pretrain_overrides],
        )
        run = pretrain(cfg, out / f"pretrain-{name}")
        pre_runs[name] = run
        init_file = export_backbone(run / "checkpoints" / "last.pt", "torchvision", out / f"{name}.pth")[0]
        inits[name] = init_file
        print(f"    exported {init_file}", flush=True)
        done()

    det = [
        f"data.train.ann={world.det_train}",
        f"data.train.images={world.det_images}",
        f"data.val.ann={world.det_val}",
        f"data.val.images={world.det_images}",
        f"seed={seed}",
    ]
    # every detector gets the pre-trained width (the CPU configs use a narrow FPN), scratch included
    widths = [f"model.backbone={cfg.model.backbone}", f"model.fpn_channels={cfg.model.fpn_channels}",
              f"model.box_head_dim={cfg.model.box_head_dim}"]
    ft_runs: dict[str, Path] = {}
    for i, (name, init) in enumerate(inits.items()):
        done = _stage(f"3/5 fine-tune Mask R-CNN from {name} ({i + 1}/{len(inits)}, same schedule)")
        cfg = load_config(
            FinetuneConfig,
            cfgs / plan.finetune_config,
            [*det, *widths, *plan.finetune_overrides, *finetune_overrides],
        )
        ft_runs[name] = finetune(cfg, str(init), out / f"finetune-{name}")
        done()

    done = _stage("4/5 compare")
    table = compare(list(ft_runs.values()))
    (out / "compare.md").write_text(table)
    print(table, flush=True)
    done()

    done = _stage("5/5 plots")
    plots = [
        plot_curves(pre_runs, ["loss", "loss_cls", "lookup_top1", "crpn_recall"], out / "pretrain_curves.png",
                    title="pre-training"),
        plot_curves(ft_runs, ["loss", "loss_classifier", "loss_box_reg", "loss_mask"], out / "finetune_curves.png",
                    title="Mask R-CNN fine-tuning"),
    ]
    for p in plots:
        print(f"    {p}", flush=True)
    done()

    results = {name: json.loads((run / "results.json").read_text()) for name, run in ft_runs.items()}
    summary = {"preset": preset, "seed": seed, "minutes": (time.time() - t_start) / 60, "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\npredet demo: finished in {summary['minutes']:.1f} min; table in {out / 'compare.md'}", flush=True)
    return {"table": table, "results": results}


def run(args: argparse.Namespace) -> int:
    demo(args.out, preset=args.preset, overwrite=args.overwrite)
    return 0
