"""PiperOpBuilder: DeepSpeed's op builders pointed at piper_ds's own csrc/ (absolute paths, names ``piper_*``).

Two flavours per op, compiling the same binding .cpp:

* ``PiperOpBuilder`` (over ``CUDAOpBuilder``): binding + CUDA kernels, sm_90 machine code plus compute_90 PTX.
  Compatible only when ``torch.cuda.is_available()`` and nvcc (CUDA_HOME) is found. The module it builds also
  runs CPU tensors (every binding carries a CPU implementation).
* ``PiperCPUOpBuilder`` (over ``CPUOpBuilder``): the binding alone, no CUDA. What CI builds and tests.

``load()`` first imports an ahead-of-time build (``PIPER_BUILD_OPS=1 pip install .`` puts it at
``absolute_name()``), else JIT-builds with ninja into ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions/<py>_<cu|cpu>/<name>``). A JIT build that is killed leaves the file ``lock`` in
that folder and every later load waits on it forever: delete the folder (``python -m piper_ds.env`` lists
stale locks).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from deepspeed.ops.op_builder.builder import TORCH_MAJOR, TORCH_MINOR, CUDAOpBuilder
from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

#: Default targets: Hopper machine code plus its PTX (PTX JIT-compiles on newer GPUs, never on older ones).
DEFAULT_ARCH_LIST = "9.0+PTX"


def csrc_root() -> Path:
    """The csrc/ folder: ``$PIPER_CSRC_DIR``, the source checkout's, or the installed copy under ``share/``."""
    import site
    candidates = [os.environ.get("PIPER_CSRC_DIR"), Path(__file__).resolve().parent.parent / "csrc"]
    candidates += [Path(base) / "share" / "piper_ds" / "csrc" for base in (sys.prefix, site.USER_BASE) if base]
    for cand in candidates:
        if cand and (Path(cand) / "includes").is_dir():
            return Path(cand).resolve()
    raise FileNotFoundError(f"piper_ds csrc/ not found (looked in {[str(c) for c in candidates if c]}); "
                            "set PIPER_CSRC_DIR to the csrc folder of a piper_ds checkout")


def arch_flags(arch_list: Optional[str] = None) -> List[str]:
    """nvcc ``-gencode`` flags for ``arch_list`` like ``"8.0;9.0+PTX"`` (default ``$PIPER_CUDA_ARCH_LIST``/9.0+PTX)."""
    arch_list = arch_list or os.environ.get("PIPER_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    flags = []
    for tok in arch_list.replace(" ", ";").split(";"):
        if not tok:
            continue
        num = tok.replace("+PTX", "").replace(".", "")
        if not num.isdigit():
            raise ValueError(f"PIPER_CUDA_ARCH_LIST entry {tok!r} is not like '9.0' or '9.0+PTX'")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if tok.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _cpp_std() -> str:
    return "-std=c++20" if (TORCH_MAJOR, TORCH_MINOR) >= (2, 12) else "-std=c++17"


class _PiperMixin:
    """What both flavours share: csrc paths, module names, AOT-or-JIT loading, and the "is it built" probe."""

    NAME = "piper_op"
    #: folders under csrc/ holding this op's sources
    SOURCES_CPP: List[str] = []
    SOURCES_CU: List[str] = []

    def absolute_name(self) -> str:
        return f"piper_ds.ops.{self.NAME}_op"

    def include_paths(self) -> List[str]:
        return [str(csrc_root() / "includes")]

    def _cpp_sources(self) -> List[str]:
        return [str(csrc_root() / s) for s in self.SOURCES_CPP]

    def jit_build_dir(self) -> Path:
        """Folder of this op's JIT build (what torch.utils.cpp_extension.load uses)."""
        from torch.utils.cpp_extension import _get_build_directory
        return Path(_get_build_directory(self.NAME, verbose=False))

    def aot_installed(self) -> bool:
        """True when an ahead-of-time build of this op is importable."""
        try:
            return importlib.util.find_spec(self.absolute_name()) is not None
        except (ImportError, ValueError):
            return False

    def jit_built(self) -> bool:
        """True when a JIT build of this op sits in the extensions folder (it may still rebuild if stale)."""
        try:
            return any(self.jit_build_dir().glob(f"{self.NAME}*.so"))
        except Exception:  # noqa: BLE001 - a probe never raises
            return False

    def stale_lock(self) -> Optional[Path]:
        """The ``lock`` file a killed JIT build left behind, if any."""
        try:
            lock = self.jit_build_dir() / "lock"
        except Exception:  # noqa: BLE001
            return None
        return lock if lock.exists() else None

    def is_built(self) -> bool:
        return self.aot_installed() or self.jit_built()

    def load(self, verbose: bool = False):
        """The op module: an AOT build if installed, else a JIT build (built now if needed)."""
        if self.NAME in self._loaded_ops:
            return self._loaded_ops[self.NAME]
        if self.aot_installed():
            module = importlib.import_module(self.absolute_name())
            self._loaded_ops[self.NAME] = module
            return module
        if not self.jit_built() and os.environ.get("LOCAL_RANK", "0") == "0":  # the build is silent for minutes
            print(f"[piper_ds] building the {self.NAME} op, once (later starts reuse it from {self.jit_build_dir()})",
                  file=sys.stderr, flush=True)
        return self.jit_load(verbose)


class PiperOpBuilder(_PiperMixin, CUDAOpBuilder):
    """Builds an op with CUDA kernels (sm_90 + compute_90 PTX unless ``PIPER_CUDA_ARCH_LIST`` says otherwise)."""

    def __init__(self):
        super().__init__(name=self.NAME)

    def sources(self) -> List[str]:
        cu = [] if self.build_for_cpu else [str(csrc_root() / s) for s in self.SOURCES_CU]
        return self._cpp_sources() + cu

    def is_compatible(self, verbose: bool = False) -> bool:
        """False without a visible GPU or without nvcc: DeepSpeed's own check says True on a CPU-only torch."""
        import torch
        reasons = []
        if not torch.cuda.is_available():
            reasons.append("torch.cuda.is_available() is False")
        if torch.version.cuda is None:
            reasons.append("torch is built without CUDA")
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
            reasons.append(f"nvcc not found (CUDA_HOME={CUDA_HOME})")
        if reasons:
            self.error_log = "; ".join(reasons)
            if verbose:
                self.warning(f"{self.NAME} is not compatible: {self.error_log}")
            return False
        return super().is_compatible(verbose)

    def compute_capability_args(self, cross_compile_archs=None) -> List[str]:
        # Explicit -gencode flags in both JIT and AOT modes; torch then adds none of its own.
        self.enable_bf16 = True
        return arch_flags()

    def cxx_args(self) -> List[str]:
        args = ["-O3", _cpp_std(), "-Wno-reorder"]
        return args if self.build_for_cpu else args + ["-DPIPER_WITH_CUDA"]

    def nvcc_args(self) -> List[str]:
        if self.build_for_cpu:
            return []
        # exact expf/division: the router's top-k must agree with the fp32 reference, so no --use_fast_math
        args = [a for a in super().nvcc_args() if a != "--use_fast_math"]
        return args + ["-DPIPER_WITH_CUDA", "-lineinfo"]


class PiperCPUOpBuilder(_PiperMixin, CPUOpBuilder):
    """Builds only the binding .cpp (its CPU implementation): works on any machine with a C++ compiler."""

    def __init__(self):
        super().__init__(name=self.NAME)

    def sources(self) -> List[str]:
        return self._cpp_sources()

    def is_compatible(self, verbose: bool = False) -> bool:
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            self.error_log = f"C++ compiler {compiler!r} not found"
            if verbose:
                self.warning(f"{self.NAME} is not compatible: {self.error_log}")
            return False
        return True

    def cxx_args(self) -> List[str]:
        # no -march=native: a cached build must stay valid on another CPU of the same ISA
        return ["-O3", _cpp_std(), "-Wno-reorder", "-fopenmp"]

    def extra_ldflags(self) -> List[str]:
        return ["-fopenmp"]

    def builder(self):
        ext = super().builder()  # DeepSpeed's CPU builder passes no link flags: OpenMP needs them
        ext.extra_link_args = self.strip_empty_entries(self.extra_ldflags())
        return ext
