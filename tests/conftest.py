"""Shared pytest setup: the `gpu` marker (GPU-only tests skip on CPU with a visible reason)."""
import pytest
import torch


def pytest_sessionstart(session):
    """DeepSpeed JIT-builds a shared-memory comm op the first time it initialises on a CPU machine (minutes on
    two cores). Build it once here, before any multi-process test starts its timeout clock; a build killed
    half-way would leave a lock file behind that makes every later initialisation wait forever."""
    if torch.cuda.is_available():
        return
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU-only machines with a reason")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine): run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
