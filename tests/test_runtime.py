"""The runtime pieces one by one, in this process: fault specs, the divergence guard, manifests, the heartbeat
watchdog (on an in-memory store), failure reports, the chatter filter, non-finite metrics."""
import io
import json
import os
import signal
import time

import pytest
import torch

from piper_ds.runtime.divergence import DivergenceError, DivergenceGuard
from piper_ds.runtime.faults import FaultSpec, parse_fault
from piper_ds.runtime.manifest import (MISSING, STAGING_PREFIX, WRONG_HASH, WRONG_SIZE, FileEntry, Layout, Manifest,
                                       check_file, complete_checkpoints, sha256_of)


def test_fault_specs():
    assert parse_fault("KILL@1:save:global_step6/*") == FaultSpec(int(signal.SIGKILL), 1, "save:global_step6/*")
    assert parse_fault("stop@0:step:3") == FaultSpec(int(signal.SIGSTOP), 0, "step:3")
    for bad in ("KILL:save:*", "KILL@x:step:1", "KILL@1", "NOPE@1:step:1"):
        with pytest.raises(ValueError, match="PIPER_FAULT"):
            parse_fault(bad)


def test_divergence_guard_counts_streaks_and_stops():
    guard = DivergenceGuard(3)
    guard.observe(1, True, 1.0)
    guard.observe(2, False, float("inf"))       # DeepSpeed skipped it
    guard.observe(3, True, float("nan"))        # applied, but the norm is not finite
    assert (guard.skipped, guard.streak) == (2, 2)
    guard.observe(4, True, 0.5)                 # a good step ends the streak
    assert (guard.skipped, guard.streak) == (2, 0)
    guard.observe(5, False, None)
    guard.observe(6, False, None)
    with pytest.raises(DivergenceError, match=r"the last 3 optimizer steps \(up to step 7\).*max_skipped_steps = 3"):
        guard.observe(7, False, None)


def test_divergence_guard_reads_device_norms_one_step_late():
    guard = DivergenceGuard(0)  # 0: counts, never stops
    guard.observe(1, True, torch.tensor(float("inf")))
    assert guard.skipped == 0 and guard.last_step is None  # not read yet: no device sync
    guard.observe(2, True, torch.tensor(1.0))
    assert guard.skipped == 1 and guard.last_step == 1
    guard.flush()
    assert guard.skipped == 1 and guard.streak == 0 and guard.last_step == 2
    for step in range(3, 30):
        guard.observe(step, False, None)
    assert guard.skipped == 28
    with pytest.raises(ValueError, match="max_skipped"):
        DivergenceGuard(-1)


def _manifest(tag, step, published_at, files=None):
    layout = Layout(world_size=2, dp_size=2, ep_size=2, pp_size=1, zero_stage=2, num_experts=4)
    return Manifest(tag=tag, step=step, published_at=published_at, layout=layout, files=files or {})


def test_check_file_and_complete_checkpoints(tmp_path):
    folder = tmp_path / "global_step2"
    folder.mkdir()
    (folder / "a.pt").write_bytes(b"x" * 100)
    size, digest = sha256_of(str(folder / "a.pt"))
    entry = FileEntry(size=size, sha256=digest)
    assert check_file(str(folder), "a.pt", entry, "sha256") == (0, 100)
    (folder / "a.pt").write_bytes(b"y" * 100)
    assert check_file(str(folder), "a.pt", entry, "sha256") == (WRONG_HASH, 100)
    assert check_file(str(folder), "a.pt", entry, "size") == (0, 100)  # sizes only: the same size passes
    (folder / "a.pt").write_bytes(b"y" * 10)
    assert check_file(str(folder), "a.pt", entry, "size") == (WRONG_SIZE, 10)
    assert check_file(str(folder), "b.pt", entry, "size") == (MISSING, -1)
    for tag, step, at in (("global_step2", 2, 10.0), ("global_step4", 4, 5.0), ("best", 4, 7.0)):
        os.makedirs(tmp_path / tag, exist_ok=True)
        (tmp_path / tag / "piper_manifest.json").write_text(_manifest(tag, step, at).model_dump_json())
    staging = tmp_path / (STAGING_PREFIX + "global_step6")  # never complete, even with a manifest
    staging.mkdir()
    (staging / "piper_manifest.json").write_text(_manifest("global_step6", 6, 20.0).model_dump_json())
    (tmp_path / "global_step8").mkdir()  # no manifest: not one of ours
    (tmp_path / "global_step9").mkdir()
    (tmp_path / "global_step9" / "piper_manifest.json").write_text("{not json")  # damaged: left out
    assert [m.tag for m in complete_checkpoints(str(tmp_path))] == ["best", "global_step4", "global_step2"]


class _Watched:
    """A Watchdog whose exit is recorded instead of ending this process."""

    @staticmethod
    def make(store, rank, timeout_s=0.6):
        from piper_ds.runtime.watchdog import Watchdog

        class Recording(Watchdog):
            exits = []

            def _exit(self, message):
                self.exits.append(message)
                self._stop.set()

        return Recording(store, rank, 2, timeout_s, interval_s=0.05)


def test_watchdog_names_a_silent_rank_and_tells_the_others():
    import torch.distributed as dist
    store = dist.HashStore()
    a, b = _Watched.make(store, 0).start(), _Watched.make(store, 1).start()
    time.sleep(1.0)  # both beat: nobody is silent
    assert a.exits == [] and b.exits == [] and a.stalled() == []
    b._stop.set()  # rank 1 freezes: its thread stops beating without saying done
    deadline = time.monotonic() + 5
    while not a.exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.exits and a.exits[0].startswith("rank 1 stopped answering: no heartbeat for"), a.exits
    assert store.get("abort").decode() == a.exits[0]  # every other rank reads the verdict
    c = _Watched.make(store, 1).start()
    deadline = time.monotonic() + 5
    while not c.exits and time.monotonic() < deadline:
        time.sleep(0.05)
    for watchdog in (a, b, c):
        watchdog.stop()
    assert c.exits and c.exits[0].startswith("stopping: rank 1 stopped answering"), c.exits


def test_watchdog_ignores_a_rank_that_ended_normally():
    import torch.distributed as dist
    store = dist.HashStore()
    a, b = _Watched.make(store, 0).start(), _Watched.make(store, 1).start()
    time.sleep(0.3)
    b.stop()  # ends normally: writes done
    time.sleep(1.5)  # well past the timeout
    assert a.exits == [] and a.stalled() == []
    a.stop()


def test_watchdog_names_a_store_that_stops_answering():
    """A frozen store host: TCP store reads then block regardless of their timeout; the watchdog's do not."""
    import threading

    import torch.distributed as dist

    class Frozen(dist.HashStore):
        frozen = threading.Event()

        def check(self, keys):
            while self.frozen.is_set():
                time.sleep(0.05)
            return super().check(keys)

    store = Frozen()
    a = _Watched.make(store, 0, timeout_s=0.5)
    a.host = "rank 1 (host of the rendezvous store)"
    b = _Watched.make(store, 1, timeout_s=0.5)
    a.start(), b.start()
    store.frozen.set()
    deadline = time.monotonic() + 5
    while not a.exits and time.monotonic() < deadline:
        time.sleep(0.05)
    store.frozen.clear()
    for watchdog in (a, b):
        watchdog.stop()
    assert a.exits and a.exits[0].startswith("rank 1 (host of the rendezvous store) stopped answering: no answer "
                                             "for"), a.exits


def test_failure_report_without_a_process_group(monkeypatch, capsys):
    from piper_ds.runtime.errors import report_failure
    try:
        raise ValueError("piper.parallel.ep_size (3) must divide the world size (2)\nmore detail")
    except ValueError as err:
        monkeypatch.setenv("RANK", "1")
        assert report_failure(err) == 1
        line = capsys.readouterr().err
        monkeypatch.setenv("RANK", "0")
        assert report_failure(err) == 1
        full = capsys.readouterr().err
    assert line == "[piper_ds] [rank 1] ValueError: piper.parallel.ep_size (3) must divide the world size (2) " \
                   "(the traceback is on rank 0)\n"
    assert full.startswith("[piper_ds] [rank 0] failed:\nTraceback") and "more detail" in full


def test_deepspeed_chatter_is_filtered():
    from piper_ds.runtime.startup import _CHATTER, _LineFilter
    out = io.StringIO()
    stream = _LineFilter(out, _CHATTER)
    stream.write("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\nkeep ")
    stream.write("this\nNo existing process group found, creating a new group named: ep_size_2\nand the rest")
    stream.close_filter()
    assert out.getvalue() == "keep this\nand the rest"


def test_non_finite_metrics_are_written():
    from piper_ds.tracking.monitor import write_scalars

    class Monitor:
        enabled, events = True, []

        def write_events(self, events):
            self.events += events

    monitor = Monitor()
    write_scalars(monitor, {"loss": float("nan"), "grad_norm": float("inf"), "aux_loss": None}, 8)
    assert [(label, str(value), step) for label, value, step in monitor.events] == \
        [("Train/Samples/loss", "nan", 8), ("Train/Samples/grad_norm", "inf", 8)]
    assert json.dumps(float("nan")) == "NaN"  # --metrics-out keeps them too
