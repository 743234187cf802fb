"""Shared fixtures: deterministic RNG, the ISAs this build and CPU can run."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Triton kernels' tests run them on CPU tensors in the interpreter, which triton reads at its
# own import: set it before any test module (or torch, which may import triton) can import it.
# EDGEVLM_TRITON_GPU=1 leaves it unset, for running tests/test_triton_kernels.py on a real GPU.
if not os.environ.get("EDGEVLM_TRITON_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def supported_isas() -> list[str]:
    from edgevlm import _core

    return list(_core.supported_isas())


def weights(rng: np.random.Generator, n: int, k: int, group: int) -> np.ndarray:
    """Random float32 W[N, K] with the awkward groups kernels must survive: an all-zero
    group, a constant group, a group of one large outlier, and all-positive rows."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[0, :group] = 0.0
    if n > 1:
        w[1, :group] = 0.75
    if n > 2:
        w[2, :group] = 0.0
        w[2, group // 2] = 40.0
    if n > 3:
        w[3] = np.abs(w[3]) + 2.0
    return w


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test: tiny models are dominated by thread start-up, and on a
    shared 2-core box two spinning threads run 10-20x slower than one."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def quiet_torch_one_thread():
    """Module-wide: one torch thread (as torch_one_thread) and no transformers progress bars or
    warnings; both restored afterwards.  Use with ``pytest.mark.usefixtures``."""
    import torch
    from transformers.utils import logging as tlog

    threads, verbosity = torch.get_num_threads(), tlog.get_verbosity()
    torch.set_num_threads(1)
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    yield
    tlog.enable_progress_bar()
    tlog.set_verbosity(verbosity)
    torch.set_num_threads(threads)
