"""Fault injection for tests of the failure paths: a chosen rank sends itself a signal at a chosen point.

Set ``PIPER_FAULT="<SIGNAL>@<rank>:<point pattern>"`` in the environment of a run, e.g.::

    PIPER_FAULT="KILL@1:save:global_step6/layer_0_expert_2_*"   # rank 1 dies after writing that file
    PIPER_FAULT="STOP@1:step:3"                                 # rank 1 freezes after optimizer step 3

``SIGNAL`` is a signal name without ``SIG`` (KILL, STOP, TERM, ...). The pattern is matched with ``fnmatch``
against the points the code reports through :func:`inject`:

* ``save:<tag>/<file>`` after each checkpoint file is written (``<tag>`` is the published tag, not the staging
  folder; ``<file>`` the path inside it);
* ``step:<n>`` after optimizer step ``n`` (``engine.global_steps``).

Unset, :func:`inject` costs one dictionary lookup.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

ENV = "PIPER_FAULT"


@dataclass(frozen=True)
class FaultSpec:
    """One fault: send ``signum`` to this process on ``rank`` at the first point matching ``pattern``."""

    signum: int
    rank: int
    pattern: str


def parse_fault(text: str) -> FaultSpec:
    """``"<SIGNAL>@<rank>:<pattern>"`` -> :class:`FaultSpec`; ValueError naming the text when malformed."""
    head, sep, pattern = text.partition(":")
    name, at, rank = head.partition("@")
    if not (sep and at and pattern and rank.isdigit()):
        raise ValueError(f"{ENV}={text!r}: expected '<SIGNAL>@<rank>:<point pattern>', e.g. 'KILL@1:save:*'")
    signum = getattr(signal, "SIG" + name.upper(), None)
    if not isinstance(signum, signal.Signals):
        raise ValueError(f"{ENV}={text!r}: unknown signal {name!r} (use a name like KILL, STOP, TERM)")
    return FaultSpec(int(signum), int(rank), pattern)


_parsed: dict = {}


def _spec() -> Optional[FaultSpec]:
    text = os.environ.get(ENV)
    if not text:
        return None
    if text not in _parsed:  # parsed once per value: inject() runs after every file and every step
        _parsed[text] = parse_fault(text)
    return _parsed[text]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def inject(point: str) -> None:
    """Sends the configured signal to this process when this rank and ``point`` match ``PIPER_FAULT``.

    Prints one line (with the wall-clock time, so a test can measure what follows) before the signal."""
    spec = _spec()
    if spec is None or spec.rank != _rank() or not fnmatch.fnmatchcase(point, spec.pattern):
        return
    name = signal.Signals(spec.signum).name
    print(f"[piper_ds] fault injection: {name} to rank {spec.rank} at {point} (time {time.time():.3f})",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), spec.signum)
