"""The one way from ``piper_ds.ops`` to the compiled ops: op_builder's loader (``op_builder/loader.py``), imported
as shipped (``piper_ds.op_builder``) or, in a source checkout that is not pip-installed, as the top-level
``op_builder``. Nothing is imported or built until an op is first asked for."""
from __future__ import annotations

from typing import List, Optional

import torch

_LOADER: List[object] = []


def loader():
    """op_builder's loader module (imported once)."""
    if not _LOADER:
        try:
            from piper_ds.op_builder import loader as module
        except ImportError:  # a source checkout that is not pip-installed: op_builder/ is top level
            from op_builder import loader as module
        _LOADER.append(module)
    return _LOADER[0]


def compiled_op(op: str, device: torch.device, backend: str) -> Optional[object]:
    """The compiled module running ``op`` for tensors on ``device`` under ``backend``, or None (the reference)."""
    return loader().get_op(op, device.type, backend)
