"""Pipelined MoE training: pipeline stages x expert parallelism x data parallelism (ZeRO-1) on DeepSpeed's
``PipelineEngine``. Importing this package is light; the engine and model import DeepSpeed's pipeline code.

* :mod:`~piper_ds.pipeline.groups` — the (pp, dp, ep) mesh, layout validation, process groups;
* :mod:`~piper_ds.pipeline.model` — the reference MoE LM as a ``PipelineModule`` (planner-balanced stages);
* :mod:`~piper_ds.pipeline.schedules` — 1F1B and the all-to-all overlap schedule, a schedule simulator;
* :mod:`~piper_ds.pipeline.engine` — :class:`PiperPipelineEngine` and :func:`initialize_pipeline`;
* :mod:`~piper_ds.pipeline.timeline` — per-rank forward/backward/all-to-all intervals and their plot.
"""
