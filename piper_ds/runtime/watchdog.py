"""Heartbeat watchdog: when a rank stops answering (frozen, stopped, killed), the others exit naming it.

Every rank runs a daemon thread that, every ``interval`` seconds, writes a counter to the rendezvous store
(key ``piper/heartbeat/<rank>``) and reads the counters of its ring neighbours (rank - 1 and rank + 1) and the
key ``piper/abort``. A neighbour whose counter has not moved for ``timeout_s`` is declared stopped: the watcher
writes the verdict to ``piper/abort``, so every other rank learns it within one interval, prints one line
naming the rank and ends its process with exit code :data:`EXIT_RANK_STOPPED`. A store that does not answer
for ``timeout_s`` (the process hosting it is frozen) ends the process the same way.

Collectives alone cannot do this: a rank blocked in an all-to-all waits for DeepSpeed's expert groups'
timeout (torch's default, 30 minutes on gloo) and its error, when it comes, names no rank. Reading two
neighbours keeps the store's load at a few operations per rank and interval at any world size.

A rank that ends normally (:meth:`Watchdog.stop`, called by ``engine.destroy()`` and at interpreter exit)
writes ``done`` and is no longer watched.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

T = TypeVar("T")

EXIT_RANK_STOPPED = 4
_DONE = "done"
_active: List["Watchdog"] = []


def call_with_timeout(fn: Callable[[], T], timeout_s: float) -> T:
    """``fn()`` run on a helper thread; TimeoutError when it has not returned after ``timeout_s`` seconds (the
    thread is left behind). TCP store reads ignore the store's timeout while its host process is stopped, so
    every store call of the runtime goes through here."""
    box: Dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, name="piper-store-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def open_store(timeout_s: float):
    """(store, host description) for runtime messages: the default process group's rendezvous store under the
    prefix ``piper/``. A TCP store gets a connection of its own: the default client serialises operations
    behind one lock, so a main thread blocked in a store wait would otherwise stall the heartbeat."""
    import torch.distributed as dist
    store = dist.distributed_c10d._get_default_store()  # private, but the only handle on the rendezvous store
    base = store
    while isinstance(base, dist.PrefixStore):  # the default group's store is prefixed twice
        base = base.underlying_store
    host = "the rendezvous store"
    if isinstance(base, dist.TCPStore):
        host = f"the rendezvous store at {base.host}:{base.port}"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # torchrun's agent hosts it otherwise
            host = f"rank 0 (host of {host})"
        base = dist.TCPStore(base.host, base.port, is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    return dist.PrefixStore("piper/", base), host


class Watchdog:
    """Heartbeats of this rank and watch of its neighbours (module docstring). ``interval_s`` None: a tenth of
    ``timeout_s``, between 0.2 and 5 seconds."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, host: str = "the rendezvous store",
                 interval_s: Optional[float] = None):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.store, self.rank, self.timeout_s, self.host = store, rank, timeout_s, host
        self.interval_s = interval_s if interval_s is not None else min(5.0, max(0.2, timeout_s / 10))
        self.peers = sorted({(rank - 1) % world_size, (rank + 1) % world_size} - {rank})
        self._seen: Dict[int, Optional[str]] = {}
        self._changed: Dict[int, float] = {}
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="piper-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        """Beats once (so neighbours see this rank at once), then starts the thread."""
        now = time.monotonic()
        self._changed = {p: now for p in self.peers}
        call_with_timeout(lambda: self._beat(0), self.timeout_s)
        self._thread.start()
        _active.append(self)
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stops the thread and marks this rank done (its neighbours stop watching it). Idempotent."""
        if self in _active:
            _active.remove(self)
        if self._done:
            return
        self._done = True
        self._stop.set()
        try:
            call_with_timeout(lambda: self.store.set(f"heartbeat/{self.rank}", _DONE), 5.0)
        except Exception:  # noqa: BLE001 - the store may be gone at exit; nothing left to tell
            pass

    def stalled(self, beats: int = 3) -> List[Tuple[int, float]]:
        """(rank, seconds since its last beat) of watched neighbours silent for more than ``beats`` intervals."""
        now = time.monotonic()
        return [(p, now - t) for p, t in self._changed.items()
                if self._seen.get(p) != _DONE and now - t > beats * self.interval_s]

    def _beat(self, counter: int) -> None:
        self.store.set(f"heartbeat/{self.rank}", f"{os.getpid()}:{counter}")

    def _read(self, key: str) -> Optional[str]:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _exchange(self, counter: int) -> Tuple[Optional[str], Dict[int, Optional[str]]]:
        """Beats, then reads the abort key and the neighbours' counters."""
        self._beat(counter)
        return self._read("abort"), {p: self._read(f"heartbeat/{p}") for p in self.peers}

    def _run(self) -> None:
        counter, last_answer = 0, time.monotonic()
        while not self._stop.wait(self.interval_s):
            counter += 1
            try:
                abort, values = call_with_timeout(lambda: self._exchange(counter), self.timeout_s)
            except Exception as err:  # noqa: BLE001 - a store that does not answer is what we watch for
                if self._stop.is_set():
                    return
                silent = time.monotonic() - last_answer
                if silent > self.timeout_s:
                    self._exit(f"{self.host} stopped answering: no answer for {silent:.1f} s "
                               f"(piper.runtime.timeout_s = {self.timeout_s:g}; {type(err).__name__}: {err})")
                continue
            now = last_answer = time.monotonic()
            if abort is not None:
                self._exit(f"stopping: {abort}")
            for peer, value in values.items():
                if value != self._seen.get(peer):
                    self._seen[peer], self._changed[peer] = value, now
            late = [(p, now - self._changed[p]) for p in self.peers
                    if self._seen.get(p) != _DONE and now - self._changed[p] > self.timeout_s]
            if late:
                peer, silent = late[0]
                verdict = (f"rank {peer} stopped answering: no heartbeat for {silent:.1f} s "
                           f"(piper.runtime.timeout_s = {self.timeout_s:g}; seen by rank {self.rank})")
                try:
                    call_with_timeout(lambda: self.store.set("abort", verdict), 5.0)
                except Exception:  # noqa: BLE001 - the others will find out themselves
                    pass
                self._exit(verdict)

    def _exit(self, message: str) -> None:
        """Ends this process (the main thread may be blocked in a collective that would wait much longer)."""
        print(f"[piper_ds] [rank {self.rank}] {message}; exiting with code {EXIT_RANK_STOPPED}", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(EXIT_RANK_STOPPED)


def start_watchdog(timeout_s: float, interval_s: Optional[float] = None) -> Optional[Watchdog]:
    """A started :class:`Watchdog` for this rank, or None for a single process (nothing to watch)."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    store, host = open_store(timeout_s)
    return Watchdog(store, dist.get_rank(), dist.get_world_size(), timeout_s, host, interval_s).start()


def stalled_ranks() -> List[Tuple[int, float]]:
    """Ranks the running watchdogs of this process find silent (for error messages); [] when none run."""
    return [s for w in list(_active) for s in w.stalled()]
