"""Loading a config: ``schema`` defaults <- YAML file <- ``key=value`` overrides (OmegaConf
structured configs), then every section's ``check()``; and writing the resolved config back.

An unknown key, or a value of the wrong type, is a :class:`~predet.errors.UserError` naming the key
(and the closest valid key, or the key it was renamed to); so is a fine-tuning config given where
a pre-training one is expected (and the reverse).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from predet.config.finetune import FinetuneConfig
from predet.config.pretrain import PretrainConfig
from predet.errors import UserError
from predet.utils import flatten_keys

__all__ = ["load_config", "save_config", "to_dict", "RENAMED", "SEED_MAX"]

T = TypeVar("T")


def load_config(
    schema: type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()
) -> T:
    """Build a config: ``schema`` defaults <- YAML at ``path`` <- ``key=value`` overrides.

    Returns an OmegaConf structured config (attribute access, typed; readonly-safe to pass around),
    its values checked: every number finite, every seed in range, and ``schema.check()``.
    Raises :class:`UserError` on a missing/unparsable file, an unknown key or a mistyped value.
    """
    valid = _valid_keys(schema)
    cfg = OmegaConf.structured(schema)
    if path is not None:
        p = Path(path)
        data = _read_yaml(p)
        _check_kind(schema, flatten_keys(data), valid, p)
        cfg = _merge_one(cfg, data, str(p), valid)
    for item in overrides:
        key, value = _parse_override(item, schema)
        cfg = _merge_one(cfg, _nest(key, value), f"override '{item}'", valid)
    try:  # a ${...} in a value is an OmegaConf reference: resolved now, not when first read
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise UserError(f"config key '{key}': {str(e).splitlines()[0]} "
                        "(a literal '${' needs an escape: '\\${')") from None  # fmt: skip
    _check_finite(cfg)
    _check_seeds(cfg, valid)
    if hasattr(schema, "check"):  # each section's rules, on the dataclasses themselves
        OmegaConf.to_object(cfg).check()
    return cfg  # type: ignore[return-value]


def _read_yaml(p: Path) -> dict:
    """The mapping of config keys in the YAML file ``p``."""
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        byte = f"byte 0x{e.object[e.start]:02x} at offset {e.start}"
        raise UserError(f"{p}: not UTF-8 text ({byte})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of config keys at the top level")
    return data


def _check_finite(cfg: DictConfig) -> None:
    """No config number is NaN or infinite (every range check is passed by a NaN)."""
    for key, value in flatten_keys(OmegaConf.to_container(cfg)).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UserError(f"{key}: must be a finite number, got {value}")


def _valid_keys(schema: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass schema, e.g. ``["seed", "data", "data.manifest", ...]``."""
    keys = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if is_dataclass(default):
                keys.extend(_valid_keys(default, name + "."))
    return keys


def _closest(key: str, valid: Sequence[str]) -> str:
    """The valid key most like ``key``: the better of the whole key against every key and its leaf
    name against every nested leaf (`lr` under the wrong section; `tau` with no section at all)."""
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in valid if "." in k}
    candidates = []  # (similarity, suggestion); on a tie the whole-key match
    m = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if m:
        candidates.append((difflib.SequenceMatcher(None, key, m[0]).ratio(), m[0]))
    m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    if m:
        candidates.append((difflib.SequenceMatcher(None, leaf, m[0]).ratio(), leaves[m[0]]))
    if not candidates:
        return ""
    return f" (did you mean '{max(candidates, key=lambda c: c[0])[1]}'?)"


# keys of earlier versions: the error names the new key
RENAMED = {
    **{f"model.{k}": f"model.crpn.{k}" for k in (
        "anchor_sizes", "aspect_ratios", "pre_nms_top_n", "post_nms_top_n", "nms_thresh")},
    **{f"model.crpn_{k}": f"model.crpn.{k}" for k in (
        "dim", "conv_dim", "batch_per_view", "positive_fraction", "fg_iou", "bg_iou")},
    **{f"model.croi_{k}": f"model.croi.{k}" for k in (
        "embed_dim", "reg_dim", "fg_iou", "query_negatives")},
    "model.num_negatives": "model.croi.num_negatives",
    "model.tau": "model.croi.tau",
    "model.cls_loss": "model.cls.loss",
    "model.jitter_boxes_per_query": "model.jitter.boxes_per_query",
}  # fmt: skip


def _check_keys(given: dict[str, Any], valid: Sequence[str], source: str) -> None:
    valid_set = set(valid)
    sections = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    for key, value in given.items():
        if key in RENAMED and RENAMED[key] in valid_set:
            raise UserError(f"{source}: config key '{key}' is now '{RENAMED[key]}'")
        if key not in valid_set:
            # a dict given for a leaf, or a leaf below a leaf, is an unknown key
            raise UserError(f"{source}: unknown config key '{key}'{_closest(key, valid)}")
        if key in sections and not isinstance(value, dict):
            raise UserError(
                f"{source}: config key '{key}' is a section: expected a mapping of its keys, "
                f"got {value!r}"
            )


def _check_kind(schema: type, given: dict[str, Any], valid: Sequence[str], path: Path) -> None:
    """A fine-tuning config given where a pre-training one is expected (or the reverse) is named
    as such, rather than as its first key that the other kind lacks ("did you mean ...")."""
    kinds = {
        PretrainConfig: ("pre-training", "pretrain"),
        FinetuneConfig: ("fine-tuning", "finetune"),
    }
    if schema not in kinds:
        return
    valid_set = set(valid)
    unknown = [k for k in given if k not in valid_set and k not in RENAMED]
    (other,) = [k for k in kinds if k is not schema]
    other_valid = set(_valid_keys(other))
    if unknown and all(k in other_valid for k in given):
        (this_name, this_dir), (other_name, _) = kinds[schema], kinds[other]
        raise UserError(
            f"{path}: a {other_name} config (its key '{unknown[0]}'), where a {this_name} one is "
            f"expected (configs/{this_dir}/*.yaml, or a {this_name} run's config.yaml)"
        )


def _merge_one(base: DictConfig, update: dict, source: str, valid: Sequence[str]) -> DictConfig:
    _check_keys(flatten_keys(update), valid, source)
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except (ValidationError, ConfigKeyError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None)
        value = getattr(e, "value", None)
        msg = str(e).splitlines()[0]
        if not key:  # not expected after _check_keys; never print "key '?'"
            raise UserError(f"{source}: {msg}") from None
        raise UserError(f"{source}: bad value {value!r} for config key '{key}': {msg}") from None


def _key_type(schema: Any, key: str) -> Any:
    """The annotated type of the dotted ``key`` of a dataclass schema; None for an unknown key."""
    t = schema
    for part in key.split("."):
        if not (isinstance(t, type) and is_dataclass(t)):
            return None
        t = typing.get_type_hints(t).get(part)
    return t


# YAML's null: sets an Optional[str] key to None (every other raw string is kept as given)
_NULL = ("null", "Null", "NULL", "~")


def _parse_override(item: str, schema: Any = None) -> tuple[str, Any]:
    """``key=value`` -> ``(key, value)``: YAML-parsed, but verbatim for a str-typed key (so that
    ``name=1.10``, ``name=off`` or ``data.manifest=0123`` stay those strings)."""
    if "=" not in item:
        raise UserError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{item}' has an empty key")
    kind = _key_type(schema, key) if schema is not None else None
    if kind is str:
        return key, raw
    if kind == Optional[str]:
        return key, None if raw in _NULL else raw
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        if raw.lstrip().startswith(("[", "{")):  # `k=[1, 2]` unquoted: the shell split it
            raise UserError(f"override '{item}': not valid YAML; quote the whole override, e.g. "
                            f"'{key}=[1, 2]'") from None  # fmt: skip
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


SEED_MAX = 2**32 - 1  # numpy's and torch's generators take seeds in [0, 2**32 - 1]


def _check_seeds(cfg: Any, valid: Sequence[str]) -> None:
    """Every ``seed`` / ``*_seed`` key is None or in [0, SEED_MAX]."""
    for key in valid:
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "seed" or leaf.endswith("_seed"):
            value = OmegaConf.select(cfg, key)
            if value is not None and not 0 <= value <= SEED_MAX:
                raise UserError(f"{key}={value}: a seed must be in [0, 2**32 - 1 = {SEED_MAX}]")


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
