"""Data: the synthetic world, manifests and vocabulary, query boxes, shards, two-view views.

``predet.data.TwoViewTransform`` and ``predet.data.collate_two_view`` are the pre-training sample
and batch contracts; ``predet.data.datasets.build_pretrain_data(cfg)`` builds the data of a run.
They are imported on first use: a command that only reads text (``predet data vocab``) never
loads torch (about 650 MB of resident memory on its own).
"""

from typing import Any

__all__ = ["TwoViewTransform", "collate_two_view", "sample_seed"]


def __getattr__(name: str) -> Any:
    if name == "collate_two_view":
        from predet.data.datasets import collate_two_view

        return collate_two_view
    if name in ("TwoViewTransform", "sample_seed"):
        from predet.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module 'predet.data' has no attribute {name!r}")
