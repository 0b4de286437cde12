"""Lint of DeepSpeed's own ds_config keys (piper_ds.config_lint): typos fail with a suggestion, keys DeepSpeed
tolerates warn, a non-positive peak learning rate fails; every shipped config passes."""
import glob
import json
import os
import warnings

import pytest

from piper_ds.config_lint import lint_ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("config, message", [
    ({"gradient_cliping": 1.0}, "unknown DeepSpeed key 'gradient_cliping' in the ds_config: did you mean "
                                "'gradient_clipping'?"),
    ({"zero_optimisation": {"stage": 2}}, "'zero_optimisation' in the ds_config: did you mean 'zero_optimization'?"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "'zero_optimization.overlap_com'.*'overlap_comm'"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memroy": True}}},
     "'zero_optimization.offload_optimizer.pin_memroy'.*'pin_memory'"),
    ({"optimizer": {"type": "AdamW", "parms": {"lr": 1e-3}}}, "'optimizer.parms'.*'params'"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_maxlr": 1e-3}}}, "'scheduler.params.warmup_maxlr'.*'warmup_max_lr'"),
    ({"activation_checkpointing": {"partition_activation": True}}, "'partition_activations'"),
    ({"bf16": {"enabeld": True}}, "'bf16.enabeld'.*'enabled'"),
    ({"zero_optimization": {"xyzzy": 1}}, r"'zero_optimization.xyzzy'.*known keys here: .*stage"),
])
def test_typos_fail_with_a_suggestion(config, message):
    with pytest.raises(ValueError, match=message):
        lint_ds_config(config)


@pytest.mark.parametrize("params, message", [
    ({"warmup_min_lr": 0.0, "warmup_max_lr": -1e-3}, r"warmup_max_lr \(-0.001\) is the peak learning rate and must "
                                                     "be > 0"),
    ({"warmup_min_lr": 0.0, "warmup_max_lr": 0.0}, r"warmup_max_lr \(0.0\)"),
    ({"warmup_min_lr": -1e-4, "warmup_max_lr": 1e-3}, r"warmup_min_lr \(-0.0001\) must be >= 0"),
])
def test_bad_learning_rates_fail(params, message):
    with pytest.raises(ValueError, match=message):
        lint_ds_config({"scheduler": {"type": "WarmupLR", "params": params}})


def test_keys_deepspeed_tolerates_warn():
    with pytest.warns(UserWarning, match="'my_notes' is not a DeepSpeed setting; DeepSpeed ignores it"):
        lint_ds_config({"my_notes": "from the sweep of Tuesday"})
    with pytest.warns(UserWarning, match="zero_optimization.cpu_offload is deprecated.*'offload_optimizer'"):
        lint_ds_config({"zero_optimization": {"stage": 2, "cpu_offload": True}})


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))))
def test_shipped_configs_pass(path):
    with open(path) as f:
        cfg = json.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        lint_ds_config(cfg)


def test_initialize_lints_before_starting_the_process_group():
    """No process group exists in this process: the ValueError must come before DeepSpeed's init."""
    import torch

    import piper_ds
    with pytest.raises(ValueError, match="did you mean 'gradient_clipping'"):
        piper_ds.initialize(model=torch.nn.Linear(2, 2),
                            config={"train_micro_batch_size_per_gpu": 1, "gradient_cliping": 1.0})
