"""How a multi-rank script ends on an error: one full traceback, from the rank with the real cause, and one
line from every other rank pointing at it.

When ranks fail, the first to fail usually has the cause (a missing file, a bad value) and the others fail
because of it ("Connection closed by peer"). :func:`run_main` lets the failing ranks agree through the
rendezvous store who came first (``compare_set`` on one key): that rank prints its full traceback, every other
rank one line naming it. Without a store (the process group never started) rank 0 prints the traceback.
When the heartbeat watchdog finds a rank silent, the error is a collective that gave up waiting for it: one
line names that rank and the exit code is 4, as when the watchdog itself ends the process.
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable, Optional, Tuple

from piper_ds.runtime.messages import rank
from piper_ds.runtime.watchdog import EXIT_RANK_STOPPED, call_with_timeout, open_store, stalled_ranks

EXIT_FAILED = 1


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _claim_first(me: int, summary: str) -> Tuple[Optional[Tuple[int, str]], str]:
    """((rank, summary) of the first rank that failed, as the store decides, or None; why None)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None, "the traceback is on rank 0"

    def claim():
        store, host = open_store(timeout_s=5.0)
        return store.compare_set("first_failure", "", f"{me}|{summary}").decode(), host

    try:  # a short wait: the store's host may be gone or frozen
        first, _ = call_with_timeout(claim, 10.0)
    except Exception:  # noqa: BLE001 - the store is gone with its host, which has most likely failed first
        return None, "the rendezvous store does not answer: its host (rank 0 under the deepspeed launcher) " \
                     "has probably failed first"
    first_rank, _, first_summary = first.partition("|")
    return (int(first_rank), first_summary), ""


def report_failure(err: BaseException) -> int:
    """Prints ``err`` as described in the module docstring; returns the exit code (4 when a rank was found
    silent, else 1)."""
    me, summary = rank(), one_line(err)
    silent = stalled_ranks()
    if silent:  # the error is a collective giving up on a silent rank: that rank is the cause, not this one
        who = ", ".join(f"rank {r} stopped answering: no heartbeat for {s:.1f} s" for r, s in silent)
        print(f"[piper_ds] [rank {me}] {who}; waiting for it failed with {summary}", file=sys.stderr, flush=True)
        return EXIT_RANK_STOPPED
    first, why = _claim_first(me, summary)
    if first is None:
        full = me == 0
        pointer = "" if full else f" ({why})"
    else:
        full = first[0] == me
        cause = "reported the same error first" if first[1] == summary else f"failed first: {first[1]}"
        pointer = "" if full else f" (rank {first[0]} {cause}; see its traceback)"
    if full:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        print(f"[piper_ds] [rank {me}] failed:\n{text}", file=sys.stderr, end="", flush=True)
    else:
        print(f"[piper_ds] [rank {me}] {summary}{pointer}", file=sys.stderr, flush=True)
    return EXIT_FAILED


def run_main(main: Callable[[], Optional[int]]) -> int:
    """Runs ``main()``; its return value (None = 0) is the exit code. An exception is reported with
    :func:`report_failure` and gives its exit code. ``SystemExit`` passes through."""
    try:
        code = main()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:  # noqa: BLE001 - every failure is reported once, in one place
        return report_failure(err)
    return 0 if code is None else int(code)

