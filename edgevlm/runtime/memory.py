"""Resident memory between the phases of a generation (issue 5's "peak RSS <= 1.2 x file + KV").

A generation has two phases that never overlap: the image encode (vision tower + connector: its
weights and its activation temporaries) and the language model (prefill + decode: its weights, the
KV cache).  Two things otherwise carry the first phase's memory into the second one's peak:

* the vision weights' file pages.  The ``.evlm`` is one read-only shared mmap, so every page the
  tower touched stays mapped, and counted in this process's RSS, for as long as the file is open
  (SmolVLM-256M q4: 50 MiB of a 149 MiB file).  :class:`FilePages` drops them with
  ``madvise(MADV_DONTNEED)``: on a file-backed mapping that only unmaps them from this process;
  the data stays in the kernel's page cache, so the next image maps them again by minor faults
  (no disk read unless the system reclaimed the cache meanwhile), a few ms per image;
* glibc's heap.  Freed numpy temporaries of a few MB stay in the heap (glibc raises its mmap
  threshold to the largest block freed, up to 32 MiB, so later blocks of that size come from the
  heap instead of mmap) and only the free memory at the heap's top beyond M_TRIM_THRESHOLD goes
  back to the system.  :func:`trim_heap` (``malloc_trim(0)``) returns every free page, including
  holes inside the heap, in ~2 ms.  (A fixed, low M_MMAP_THRESHOLD would avoid the retention but
  page-faults every temporary afresh: session 7 measured encode 2.8 -> 4.1 s, prefill 2x slower.)
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["FilePages", "trim_heap"]

PAGE = mmap.PAGESIZE


def _mapping_of(view: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """(the mmap a tensor view of an EvlmFile lies in, the view's byte offset in it), or None
    when the view is not a slice of an mmap (then nothing may be madvised: MADV_DONTNEED on
    anonymous memory would zero it)."""
    root = view
    while isinstance(root.base, np.ndarray):
        root = root.base
    owner = root.base.obj if isinstance(root.base, memoryview) else root.base
    if not isinstance(owner, mmap.mmap) or root.nbytes != len(owner):
        return None
    return owner, view.__array_interface__["data"][0] - root.__array_interface__["data"][0]


class FilePages:
    """The whole pages of a set of an EvlmFile's tensors, to drop from this process's RSS.

    ``FilePages(f, select)``: ``f`` an open :class:`edgevlm.format.EvlmFile`, ``select(name)``
    True for the tensors to cover.  Runs of adjacent selected tensors are merged and rounded
    inwards to page boundaries, so a page shared with an unselected tensor stays mapped.
    :meth:`release` is always safe for correctness (a dropped page reads back from the page
    cache on its next access); it does nothing where the file is not an mmap or the platform
    lacks ``madvise``.  Re-mapping SmolVLM-256M q4's 49.7 MiB of vision pages after a release
    took 1.8 ms (one read per page, page cache warm)."""

    def __init__(self, f: Any, select: Callable[[str], bool]) -> None:
        spans: list[tuple[int, int, bool]] = []               # (start, end, selected), every tensor
        self._mm: mmap.mmap | None = None
        for name in f.records:
            view = np.asarray(f[name])
            where = _mapping_of(view)
            if where is None:
                spans = []
                self._mm = None
                break
            self._mm, start = where
            spans.append((start, start + view.nbytes, bool(select(name))))
        # Runs of adjacent selected tensors become one range (the alignment padding between them
        # included), so a page they share is dropped too; an unselected tensor ends the run.
        merged: list[list[int]] = []
        prev_selected = False
        for s, e, sel in sorted(spans):
            if sel and prev_selected:
                merged[-1][1] = max(merged[-1][1], e)
            elif sel:
                merged.append([s, e])
            prev_selected = sel
        #: (offset, length) in the mapping, page aligned
        self.ranges = [(-(-s // PAGE) * PAGE, e // PAGE * PAGE - -(-s // PAGE) * PAGE) for s, e in merged
                       if e // PAGE * PAGE > -(-s // PAGE) * PAGE]
        self.supported = self._mm is not None and hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)

    def release(self) -> int:
        """Unmap the pages from this process (they stay cached); bytes covered (0 if unsupported)."""
        if not self.supported or self._mm is None or self._mm.closed:
            return 0
        for off, n in self.ranges:
            self._mm.madvise(mmap.MADV_DONTNEED, off, n)
        return self.nbytes


_malloc_trim: Any = None


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``); False where the C
    library has no malloc_trim (musl, macOS, Windows)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:  # the symbols already loaded into the process (the C library included) on ELF platforms
            fn = getattr(ctypes.CDLL(None), "malloc_trim", None)
        except (OSError, TypeError):  # Windows: CDLL(None) is not supported
            fn = None
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        _malloc_trim = fn or False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True
