"""``python -m piper_ds.env``: what piper_ds's compiled ops look like on this machine (in the spirit of ds_report).

Prints torch/CUDA/DeepSpeed versions and, for each op of ``op_builder.ALL_OPS``: whether it is compatible here,
whether it is built (ahead of time, or in the JIT cache), loaded in this process, and any stale JIT lock.
``--build`` builds every compatible op first (in parallel), which is also the way to warm the JIT cache.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional


def _op_builder():
    """The op_builder package with its ``builder`` and ``loader`` submodules imported."""
    try:
        import piper_ds.op_builder as ob
    except ImportError:  # source checkout that is not pip-installed
        import op_builder as ob
    import importlib
    for sub in ("builder", "loader"):
        importlib.import_module(f"{ob.__name__}.{sub}")
    return ob


def _nvcc_version() -> str:
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "not found"
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"error: {err}"
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[0].split(",", 1)[-1].strip() if lines else "unknown"


def environment() -> Dict[str, str]:
    """Versions and paths that decide whether and how the ops build."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    try:
        from importlib.metadata import version
        ds_version = version("deepspeed")
    except Exception:  # noqa: BLE001
        ds_version = "not installed"
    gpus = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    ob = _op_builder()
    from torch.utils.cpp_extension import _get_build_directory
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda),
        "CUDA available": str(torch.cuda.is_available()),
        "GPUs": ", ".join(gpus) or "none",
        "CUDA_HOME": str(CUDA_HOME),
        "nvcc": _nvcc_version(),
        "deepspeed": ds_version,
        "csrc": str(ob.builder.csrc_root()),
        "CUDA targets": " ".join(ob.builder.arch_flags()),
        "JIT cache": os.path.dirname(_get_build_directory("piper_x", verbose=False)),
    }


def op_rows() -> List[Dict[str, str]]:
    """One row per op: name, kind, compatible, built, loaded, notes."""
    ob = _op_builder()
    rows = []
    for name, cls in ob.ALL_OPS.items():
        b = cls()
        compatible = b.is_compatible(verbose=False)
        built = "AOT" if b.aot_installed() else ("JIT cache" if b.jit_built() else "no")
        notes = [] if compatible else [b.error_log or ""]
        lock = b.stale_lock()
        if lock is not None:
            notes.append(f"lock file {lock} (a killed build? delete its folder)")
        if name in ob.loader.failures():
            notes.append(ob.loader.failures()[name])
        kind = "CPU" if isinstance(b, ob.builder.PiperCPUOpBuilder) else "CUDA+CPU"
        rows.append({"op": name, "kind": kind, "compatible": str(compatible),
                     "built": built, "loaded": str(name in b._loaded_ops), "notes": "; ".join(n for n in notes if n)})
    return rows


def build_all(verbose: bool = False, names: Optional[List[str]] = None) -> Dict[str, str]:
    """Builds every compatible op, or those ``names`` (several at a time); returns name -> "ok" or the error."""
    ob = _op_builder()
    unknown = sorted(set(names or ()) - set(ob.ALL_OPS))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {sorted(ob.ALL_OPS)}")
    todo = [cls for name, cls in ob.ALL_OPS.items() if not names or name in names]

    def one(cls):
        b = cls()
        if not b.is_compatible():
            return b.NAME, f"skipped: {b.error_log}"
        try:
            b.load(verbose=verbose)
            return b.NAME, "ok"
        except Exception as err:  # noqa: BLE001 - reported in the table
            return b.NAME, f"failed: {err}"

    with ThreadPoolExecutor(max_workers=max(2, min(len(todo), (os.cpu_count() or 2) // 4))) as pool:
        return dict(pool.map(one, todo))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piper_ds.env", description=__doc__.splitlines()[0])
    parser.add_argument("--build", nargs="*", metavar="OP", default=None,
                        help="build these ops (default: every compatible one) before reporting")
    parser.add_argument("--verbose", action="store_true", help="show the build commands")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table
    console = Console()
    try:
        results = build_all(args.verbose, args.build) if args.build is not None else {}
    except ValueError as err:
        parser.error(str(err))
    env = Table(title="piper_ds environment", show_header=False)
    for key, value in environment().items():
        env.add_row(key, value)
    console.print(env)
    ops = Table(title="piper_ds ops")
    for col in ("op", "kind", "compatible", "built", "loaded"):
        ops.add_column(col, no_wrap=True)
    ops.add_column("notes", overflow="fold")
    for row in op_rows():
        if row["op"] in results and results[row["op"]] != "ok":
            row["notes"] = "; ".join(filter(None, [row["notes"], results[row["op"]]]))
        ops.add_row(*row.values())
    console.print(ops)
    console.print("A killed JIT build leaves a 'lock' file in its JIT cache folder and later builds wait on it "
                  "forever: delete that folder.", style="dim")
    return 1 if any(v.startswith("failed") for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
