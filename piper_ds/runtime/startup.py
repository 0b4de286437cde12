"""Starting a run: the process group with ``piper.runtime.timeout_s``, one line before a first-time op build,
and DeepSpeed's repeated per-rank chatter kept out of the way.

DeepSpeed prints some lines on every rank (its CPU comm op "built successfully", "No existing process group
found, creating a new group named ..." once per MoE layer) and logs warnings on every rank. In quiet mode
(``piper.runtime.quiet_deepspeed``, the default) those prints are dropped, DeepSpeed's logger shows warnings
on rank 0 only (without the one WarmupLR logs whenever it is built), and torch's deprecation warning about
DeepSpeed's own all_gather call is hidden (a process-wide warnings filter). The lines DeepSpeed writes while
it is imported (accelerator detection) and the launcher's own come before any config is read and stay.
"""
from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import re
import sys
import warnings
from datetime import timedelta
from typing import Iterator, Optional

from piper_ds.runtime.messages import rank

_CHATTER = (re.compile(r"^DeepSpeed \S+ built successfully$"),
            re.compile(r"^No existing process group found, creating a new group named: "))
#: Warnings DeepSpeed logs on every start for nothing the user did (WarmupLR reads its own rate when built).
_NOISE = ("Attempting to get learning rate from scheduler before it has started",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in _NOISE


_DROP_NOISE = _DropNoise()


class _LineFilter(io.TextIOBase):
    """A text stream that passes complete lines to ``target`` unless one of ``patterns`` matches them."""

    def __init__(self, target, patterns):
        super().__init__()
        self.target, self.patterns, self._partial = target, patterns, ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if not any(p.search(line) for p in self.patterns):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_filter(self) -> None:
        if self._partial:
            self.target.write(self._partial)
            self._partial = ""
        self.target.flush()


@contextlib.contextmanager
def quiet_deepspeed(quiet: bool) -> Iterator[None]:
    """Inside: DeepSpeed's chatter prints are dropped (``quiet``); on entry and on exit its logger is set to
    warnings on rank 0 and errors elsewhere (DeepSpeed's engine resets the level from the ds_config's
    ``log_level`` while it is built). With ``quiet`` False nothing changes."""
    if not quiet:
        yield
        return
    _quiet_logger()
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    stream = _LineFilter(sys.stdout, _CHATTER)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.close_filter()
        _quiet_logger()


def _quiet_logger() -> None:
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING if rank() == 0 else logging.ERROR)
    logger.addFilter(_DROP_NOISE)  # a no-op when already added


def announce_builds() -> None:
    """One line (local rank 0) before DeepSpeed JIT-builds its CPU shared-memory comm op for the first time on
    this machine, which takes a minute or two with no output of its own."""
    name = _unbuilt_shm_op()
    if name is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"[piper_ds] building DeepSpeed's CPU communication op {name}, once per machine (a minute or two; "
              "later starts reuse it)", file=sys.stderr, flush=True)


def _unbuilt_shm_op() -> Optional[str]:
    """The name of DeepSpeed's CPU comm op when init_distributed is about to JIT-build it, else None."""
    import importlib.util

    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return None
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    try:
        if importlib.util.find_spec(builder.absolute_name()) is not None:  # built ahead of time
            return None
    except ImportError:  # its parent package does not exist either: not built ahead of time
        pass
    folder = _get_build_directory(builder.NAME, verbose=False)
    return None if glob.glob(os.path.join(folder, f"{builder.NAME}*.so")) else builder.NAME


def init_distributed(runtime, dist_init_required: Optional[bool] = None, distributed_port: Optional[int] = None) -> None:
    """DeepSpeed's ``init_distributed`` with ``runtime.timeout_s`` (``piper.runtime``) as the process-group
    timeout, after :func:`announce_builds`. A process group that already exists keeps its own timeout."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT
    announce_builds()
    with quiet_deepspeed(runtime.quiet_deepspeed):
        dist.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                              distributed_port=distributed_port or TORCH_DISTRIBUTED_DEFAULT_PORT,
                              dist_init_required=dist_init_required, timeout=timedelta(seconds=runtime.timeout_s))
