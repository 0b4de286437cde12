"""The op builders, the backend loader and `python -m piper_ds.env` (tier 2, CPU).

Also home of ``cpu_ops()``: the C++ CPU ops built once per session (both at once; cached in the JIT cache,
``TORCH_EXTENSIONS_DIR``), which test_ops_gating.py and test_ops_permute.py import.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

try:
    from piper_ds.op_builder import ALL_OPS, builder as ob_builder, loader
except ImportError:  # a source checkout without `pip install -e .`
    from op_builder import ALL_OPS, builder as ob_builder, loader


OPS = ("gating", "permute", "activation", "adamw", "rope")


@functools.lru_cache(maxsize=None)
def cpu_ops():
    """{"gating": module, "permute": module, ...}: the CPU builds, compiled in parallel on first use."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        mods = list(pool.map(lambda op: loader.get_op(op, "cpu", "cpu"), OPS))
    return dict(zip(OPS, mods))


def _nvcc_found() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def test_all_ops_are_named_and_point_at_absolute_sources():
    assert {f"piper_{op}{flavour}" for op in OPS for flavour in ("", "_cpu")} <= set(ALL_OPS)
    for name, cls in ALL_OPS.items():
        b = cls()
        assert name == b.NAME == b.name and name.startswith("piper_")
        assert b.absolute_name() == f"piper_ds.ops.{name}_op"
        paths = b.sources() + b.include_paths()
        assert paths and all(os.path.isabs(p) and os.path.exists(p) for p in paths), paths


def test_cuda_builders_compatible_only_with_gpu_and_nvcc():
    expected = torch.cuda.is_available() and torch.version.cuda is not None and _nvcc_found()
    for cls in ALL_OPS.values():
        b = cls()
        if isinstance(b, ob_builder.PiperOpBuilder):
            assert b.is_compatible() == expected, b.error_log
            if not expected:
                assert b.error_log  # says why


def test_cuda_builder_targets_sm90_and_ptx():
    b = ALL_OPS["piper_gating"]()
    flags = b.compute_capability_args()
    assert flags == ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    assert ob_builder.arch_flags("8.0;9.0+PTX") == ["-gencode=arch=compute_80,code=sm_80",
                                                     "-gencode=arch=compute_90,code=sm_90",
                                                     "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(ValueError, match="sm_90"):
        ob_builder.arch_flags("sm_90")
    b.build_for_cpu = True
    assert all(not s.endswith(".cu") for s in b.sources())  # a CPU-only build of the CUDA flavour
    assert "-DPIPER_WITH_CUDA" not in b.cxx_args()


def test_op_builder_does_not_pass_for_deepspeeds_own():
    package = loader.__name__.rsplit(".", 1)[0]  # piper_ds.op_builder, or op_builder in a bare checkout
    assert not hasattr(sys.modules[package], "__deepspeed__")
    with pytest.raises(ImportError):
        exec(f"from {package} import __deepspeed__")


def test_import_piper_ds_and_deepspeed_from_the_repo_root():
    """With op_builder/ importable as a top-level package, neither import may break or build anything."""
    code = ("import sys, piper_ds, piper_ds.ops; assert 'deepspeed' not in sys.modules; "
            "import deepspeed; from deepspeed.ops.op_builder import FusedAdamBuilder; "
            "from deepspeed.accelerator import get_accelerator; print('ok', get_accelerator()._name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_backend_argument_is_checked():
    x = torch.randn(3, 8)
    from piper_ds.ops import expand_rows, fused_gating
    with pytest.raises(ValueError, match="backend"):
        fused_gating(x, 2, backend="fast")
    with pytest.raises(ValueError, match="CUDA tensors"):
        fused_gating(x, 2, backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        expand_rows(x, torch.zeros(3, 1, dtype=torch.int64), 3, backend="cuda")


def test_cpu_ops_build_and_auto_uses_them_once_built():
    mods = cpu_ops()
    assert not mods["gating"].has_cuda() or torch.cuda.is_available()
    for op in OPS:
        assert loader.get_op(op, "cpu", "auto") is not None  # built: "auto" picks the C++ op for CPU tensors
        assert loader.get_op(op, "cpu", "reference") is None


def test_env_report_lists_every_op(capsys):
    cpu_ops()
    from piper_ds import env
    rows = {r["op"]: r for r in env.op_rows()}
    assert set(rows) == set(ALL_OPS)
    for name in (f"piper_{op}_cpu" for op in OPS):
        assert rows[name]["compatible"] == "True" and rows[name]["built"] in ("JIT cache", "AOT")
    info = env.environment()
    assert info["torch"] == torch.__version__ and "sm_90" in info["CUDA targets"]
    assert env.main([]) == 0
    text = capsys.readouterr().out
    assert "piper_gating" in text and "lock" in text
