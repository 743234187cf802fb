"""Keep numpy's BLAS off the cores the edgevlm kernels use.

The kernels run on their own thread pool (``edgevlm.runtime.set_num_threads``, every core by
default). A runtime still makes a few dense numpy matmuls (float16 patch embeddings and
projections, prefill attention scores); with a multi-threaded OpenBLAS each one leaves its
worker threads spinning for a long while after it returns, on the very cores the next packed
GEMM wants. Measured on a 2-vCPU Xeon, a ViT-B/16-sized 4-bit image encode with 2 kernel
threads: 119 ms with numpy's OpenBLAS at 2 threads, 66 ms with it at 1 (1 kernel thread: 106
ms either way). So loading a model limits numpy's BLAS to one thread, process-wide, through
threadpoolctl (a small pure-Python dependency that finds the loaded BLAS libraries).

``EDGEVLM_BLAS_THREADS=N`` sets another limit; ``0`` leaves numpy's BLAS alone.
"""

from __future__ import annotations

import os

_done = False


def limit_numpy_blas() -> int | None:
    """Apply the limit once per process; returns it (None: left alone or threadpoolctl absent)."""
    global _done
    want = os.environ.get("EDGEVLM_BLAS_THREADS", "1").strip()
    try:
        n = int(want)
    except ValueError:
        raise ValueError(f"EDGEVLM_BLAS_THREADS must be a whole number (0 = leave numpy's BLAS alone), "
                         f"got {want!r}") from None
    if n < 0:
        raise ValueError(f"EDGEVLM_BLAS_THREADS must be >= 0, got {n}")
    if _done or n == 0:
        return None if n == 0 else n
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an install without it: correct results, only slower with >1 kernel thread
        return None
    threadpool_limits(limits=n, user_api="blas")  # persists: the returned object is not a context here
    _done = True
    return n
