"""Lint of DeepSpeed's own keys in a ds_config: a typo is an error with a suggestion, never a silent default.

DeepSpeed ignores unknown top-level keys (other tools keep their blocks in the same JSON, as piper_ds keeps
``"piper"``) and unknown keys of the sections it reads as plain dicts, so ``"gradient_cliping": 1.0`` trains
without clipping and ``"zero_optimisation"`` with ZeRO-0. :func:`lint_ds_config` checks:

* top-level keys: one close to a DeepSpeed key (difflib ratio >= 0.8) is a ValueError saying "did you mean";
  any other unknown key is a warning (DeepSpeed keeps such keys on purpose, for other tools' blocks);
* keys inside the sections listed in :data:`MODEL_SECTIONS` (parsed by DeepSpeed's pydantic models, nested
  blocks included) and :data:`DICT_SECTIONS` (read key by key): an unknown key is a ValueError with the
  closest known key or the list; a field DeepSpeed keeps only for compatibility (deprecated) is a warning
  naming its replacement;
* ``scheduler.params``: keys must be parameters of the named ``deepspeed.runtime.lr_schedules`` class; a peak
  learning rate (``warmup_max_lr``, ``cycle_max_lr``) <= 0 or any negative ``*_lr`` is a ValueError.

The known keys come from DeepSpeed itself, so they follow the installed 0.19.x: the top-level and dict-section
keys are those ``DeepSpeedConfig`` looks up while it parses a probe config (recorded by a dict that notes
every lookup), plus ``sequence_parallel_size`` / ``data_parallel_size`` (read by ``deepspeed.initialize``);
the model sections' keys are the models' fields and aliases. ``optimizer.params`` is not checked: which
arguments are valid depends on the optimizer class DeepSpeed picks.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import typing
import warnings
from typing import Any, Dict, FrozenSet, Mapping, Optional, Set, Tuple

#: Sections DeepSpeed parses with a pydantic model: (module, class).
MODEL_SECTIONS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "bfloat16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "comet": ("deepspeed.monitor.config", "CometConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
    "hybrid_engine": ("deepspeed.runtime.config", "HybridEngineConfig"),
    "tensor_parallel": ("deepspeed.runtime.tensor_parallel.config", "TPTrainingConfig"),
}
#: Sections DeepSpeed reads key by key from a plain dict (their keys are recorded by the probe).
DICT_SECTIONS = ("optimizer", "scheduler", "activation_checkpointing", "flops_profiler", "data_types")
#: Top-level keys read outside DeepSpeedConfig (by deepspeed.initialize) and piper_ds's own blocks (the
#: planner writes its prediction as "piper_plan").
EXTRA_TOP_LEVEL = ("sequence_parallel_size", "data_parallel_size", "piper", "piper_plan")
_PROBE = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {}},
          "scheduler": {"type": "WarmupLR", "params": {}}, **{s: {} for s in DICT_SECTIONS[2:]}}
_PEAK_LR_KEYS = ("warmup_max_lr", "cycle_max_lr")


class _Keys:
    """``dict.keys()`` of a :class:`_Recorder` whose membership tests are recorded too."""

    def __init__(self, owner: "_Recorder"):
        self.owner = owner

    def __contains__(self, key) -> bool:
        return key in self.owner

    def __iter__(self):
        return iter(dict.keys(self.owner))

    def __len__(self) -> int:
        return dict.__len__(self.owner)


class _Recorder(dict):
    """A dict that records the dotted path of every key looked up, wrapping nested dicts the same way."""

    def __init__(self, data: Mapping, prefix: str, seen: Set[str]):
        super().__init__(data)
        self.prefix, self.seen = prefix, seen

    def _wrap(self, key, value):
        if isinstance(value, dict) and not isinstance(value, _Recorder):
            return _Recorder(value, f"{self.prefix}{key}.", self.seen)
        return value

    def __getitem__(self, key):
        self.seen.add(f"{self.prefix}{key}")
        return self._wrap(key, super().__getitem__(key))

    def get(self, key, default=None):
        self.seen.add(f"{self.prefix}{key}")
        return self._wrap(key, super().get(key, default))

    def __contains__(self, key) -> bool:
        self.seen.add(f"{self.prefix}{key}")
        return super().__contains__(key)

    def keys(self):
        return _Keys(self)


@functools.lru_cache(maxsize=1)
def _probed_keys() -> FrozenSet[str]:
    """Dotted paths of every key DeepSpeedConfig looks up while parsing :data:`_PROBE`."""
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger
    seen: Set[str] = set()
    level = logger.level
    logger.setLevel(logging.ERROR)  # the probe's own info lines are noise
    try:
        DeepSpeedConfig(_Recorder(_PROBE, "", seen))
    finally:
        logger.setLevel(level)
    return frozenset(seen)


def _model_class(section: str):
    import importlib
    module, name = MODEL_SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def _model_keys(model) -> Tuple[Set[str], Dict[str, str], Dict[str, Any]]:
    """(accepted keys, deprecated key -> replacement, key -> nested model class) of a pydantic model."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    keys, deprecated, nested = set(), {}, {}
    for name, field in model.model_fields.items():
        names = {name} | ({field.alias} if field.alias else set())
        keys |= names
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("deprecated"):
            deprecated.update({n: extra.get("new_param", "") for n in names})
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, DeepSpeedConfigModel):
                nested.update({n: arg for n in names})
    return keys, deprecated, nested


def _unknown(path: str, key: str, known, error: bool = True) -> Optional[str]:
    """The message for an unknown ``key`` at ``path`` (with a suggestion when one is close)."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    where = f"{path}.{key}" if path else key
    if close:
        return f"unknown DeepSpeed key {where!r} in the ds_config: did you mean {close[0]!r}?"
    if not error:
        return None
    return f"unknown DeepSpeed key {where!r} in the ds_config; known keys here: {', '.join(sorted(known))}"


def _check_model(path: str, block: Mapping, model) -> None:
    keys, deprecated, nested = _model_keys(model)
    for key, value in block.items():
        if key not in keys:
            raise ValueError(_unknown(path, key, keys))
        if key in deprecated:
            instead = f"; use {deprecated[key]!r}" if deprecated[key] else ""
            warnings.warn(f"ds_config key {path}.{key} is deprecated (DeepSpeed still accepts it){instead}",
                          UserWarning, stacklevel=4)
        if key in nested and isinstance(value, Mapping):
            _check_model(f"{path}.{key}", value, nested[key])


def _check_scheduler(block: Mapping) -> None:
    from deepspeed.runtime import lr_schedules
    params = block.get("params") or {}
    kind = block.get("type")
    cls = getattr(lr_schedules, kind, None) if isinstance(kind, str) else None
    if isinstance(cls, type) and kind in lr_schedules.VALID_LR_SCHEDULES:
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "optimizer"}
        for key in params:
            if key not in accepted:
                raise ValueError(_unknown("scheduler.params", key, accepted))
    for key, value in params.items():
        if not key.endswith("_lr") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in _PEAK_LR_KEYS and value <= 0:
            raise ValueError(f"scheduler.params.{key} ({value}) is the peak learning rate and must be > 0")
        if value < 0:
            raise ValueError(f"scheduler.params.{key} ({value}) must be >= 0: a negative learning rate trains "
                             "uphill")


def lint_ds_config(ds_config: Mapping[str, Any]) -> None:
    """Checks DeepSpeed's keys of ``ds_config`` as the module docstring says: ValueError naming the key (and a
    suggestion) for a typo, a ``UserWarning`` for keys DeepSpeed tolerates."""
    probed = _probed_keys()
    top = {k for k in probed if "." not in k} | set(EXTRA_TOP_LEVEL)
    for key, value in ds_config.items():
        if key not in top:
            message = _unknown("", key, top, error=False)
            if message:
                raise ValueError(message)
            warnings.warn(f"ds_config key {key!r} is not a DeepSpeed setting; DeepSpeed ignores it",
                          UserWarning, stacklevel=2)
            continue
        if not isinstance(value, Mapping):
            continue
        if key in MODEL_SECTIONS:
            _check_model(key, value, _model_class(key))
        elif key in DICT_SECTIONS:
            known = {k[len(key) + 1:].split(".")[0] for k in probed if k.startswith(key + ".")}
            for sub in value:
                if sub not in known:
                    raise ValueError(_unknown(key, sub, known))
        if key == "scheduler":
            _check_scheduler(value)
