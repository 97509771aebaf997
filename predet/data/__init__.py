"""Data: the synthetic world, manifests and vocabulary, query boxes, shards, two-view views.

``predet.data.TwoViewTransform`` and ``predet.data.collate_two_view`` are the pre-training sample
and batch contracts; ``predet.data.datasets.build_pretrain_data(cfg)`` builds the data of a run.
"""

from predet.data.datasets import collate_two_view
from predet.data.transforms import TwoViewTransform, sample_seed

__all__ = ["TwoViewTransform", "collate_two_view", "sample_seed"]
