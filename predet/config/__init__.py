"""Typed configs: defaults <- YAML file <- ``key=value`` overrides (OmegaConf structured configs).

One module per command's schema (:mod:`~predet.config.pretrain`, :mod:`~predet.config.finetune`,
the ``ckpt`` section and the shared ``train`` rules in :mod:`~predet.config.common`), each section a
dataclass with its ``check()`` beside its fields; loading, key errors ("did you mean", renamed
keys, a config of the other kind) and writing in :mod:`~predet.config.loading`.

Every run writes its fully resolved config to ``RUN/config.yaml``. An unknown key, or a value of the
wrong type or out of range, is a :class:`~predet.errors.UserError` naming the key (and the closest
valid key).

Example::

    cfg = load_config(PretrainConfig, "configs/pretrain/tiny_cpu.yaml", ["train.steps=50"])
    cfg.train.steps  # 50
"""

from omegaconf import MISSING

from predet.config.common import CkptConfig
from predet.config.finetune import (
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneModelConfig,
    FinetuneTrainConfig,
    SplitConfig,
)
from predet.config.loading import RENAMED, SEED_MAX, load_config, save_config, to_dict
from predet.config.pretrain import (
    LOSS_SWITCHES,
    MIN_INPUT_SIZE,
    QUERY_REGIONS,
    AugConfig,
    ClsConfig,
    CROIConfig,
    CRPNConfig,
    JitterConfig,
    LossConfig,
    PretrainConfig,
    PretrainDataConfig,
    PretrainModelConfig,
    PretrainTrainConfig,
)

__all__ = [
    # loading
    "load_config", "save_config", "to_dict", "MISSING", "RENAMED", "SEED_MAX",
    # pre-training
    "PretrainConfig", "PretrainDataConfig", "AugConfig", "PretrainModelConfig", "ClsConfig",
    "CRPNConfig", "JitterConfig", "CROIConfig", "LossConfig", "LOSS_SWITCHES",
    "PretrainTrainConfig", "QUERY_REGIONS", "MIN_INPUT_SIZE",
    # fine-tuning
    "FinetuneConfig", "FinetuneDataConfig", "SplitConfig", "FinetuneModelConfig",
    "FinetuneTrainConfig",
    # both
    "CkptConfig",
]  # fmt: skip
