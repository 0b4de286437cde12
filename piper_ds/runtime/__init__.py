"""What keeps a run safe and legible when something goes wrong (the ``"piper": {"runtime", "checkpoint"}``
blocks; docs/fault_tolerance.md):

* :mod:`~piper_ds.runtime.checkpoint` / :mod:`~piper_ds.runtime.manifest`: atomic checkpoints with a manifest,
  verified resume with fallback, layout check, keep-last-N;
* :mod:`~piper_ds.runtime.watchdog`: heartbeats; a silent rank makes the others exit naming it;
* :mod:`~piper_ds.runtime.divergence`: skipped-step counter and stop after N in a row;
* :mod:`~piper_ds.runtime.startup`: process-group timeout, first-build notice, DeepSpeed's chatter quieted;
* :mod:`~piper_ds.runtime.errors`: one traceback per failure, one line from every other rank;
* :mod:`~piper_ds.runtime.faults`: fault injection for tests (``PIPER_FAULT``);
* :mod:`~piper_ds.runtime.guards`: the engine mixin that wires them in.
"""
