"""Measurement tools: each ``python -m piper_ds.bench.<tool>`` (README's table of command-line tools), sharing
the timing, distributed start and record metadata of :mod:`piper_ds.bench.common`. They may import the
runtime and the planner; neither imports them."""
