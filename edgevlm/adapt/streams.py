"""Per-stream Q-TTA states (a camera, a session) sharing one classifier, LRU-bounded."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator

import numpy as np

from edgevlm.adapt.qtta import QTTA, QTTAConfig

__all__ = ["StreamStates"]


class StreamStates:
    """Per-stream Q-TTA states (stream id → :class:`QTTA`) sharing one float32 classifier.

    At most ``max_streams`` states are held. Using a stream (``get``/``__call__``) marks it most
    recently used; creating a new stream when ``max_streams`` are held evicts the least recently
    used one: its caches are dropped (``on_evict(stream_id, qtta)`` is called first, e.g. to
    ``qtta.save(...)`` it) and, if that id comes back later, it starts again from zero-shot.
    So total state is bounded by :meth:`bytes_for` (classifier once + max_streams × per-stream
    caches), however many streams come and go. ``config.memory_budget_bytes`` applies to each
    stream's caches (the shared classifier excluded).
    """

    def __init__(
        self,
        text_classifier: np.ndarray,
        config: QTTAConfig = QTTAConfig(),
        *,
        max_streams: int = 16,
        on_evict: Callable[[Hashable, QTTA], None] | None = None,
    ) -> None:
        if isinstance(max_streams, bool) or not isinstance(max_streams, (int, np.integer)) or max_streams < 1:
            raise ValueError(f"max_streams must be an integer >= 1, got {max_streams!r}")
        # Validates the classifier once and holds the shared float32 copy; with empty caches it
        # also serves zero-shot requests.
        self._zs = QTTA(text_classifier, self._zero_cfg(config))
        self._W = self._zs.classifier
        if config.memory_budget_bytes is not None:  # fail now rather than at the first stream
            QTTA(self._W, config, copy_classifier=False)
        self.config = config
        self.max_streams = int(max_streams)
        self.on_evict = on_evict
        self._streams: OrderedDict[Hashable, QTTA] = OrderedDict()

    @staticmethod
    def _zero_cfg(config: QTTAConfig) -> QTTAConfig:
        return dataclasses.replace(config, pos_capacity=0, neg_capacity=0, memory_budget_bytes=None)

    @staticmethod
    def bytes_for(num_classes: int, dim: int, config: QTTAConfig = QTTAConfig(), max_streams: int = 16) -> int:
        """Upper bound on :attr:`nbytes`: the shared classifier once plus ``max_streams`` caches."""
        shared = QTTA.bytes_for(num_classes, dim, StreamStates._zero_cfg(config), include_classifier=True)
        return shared + max_streams * QTTA.bytes_for(num_classes, dim, config, include_classifier=False)

    @property
    def nbytes(self) -> int:
        return self._zs.nbytes + sum(q.nbytes for q in self._streams.values())

    def get(self, stream_id: Hashable) -> QTTA:
        """The state of ``stream_id``, created (and the LRU stream evicted if full) when new."""
        q = self._streams.get(stream_id)
        if q is not None:
            self._streams.move_to_end(stream_id)
            return q
        q = QTTA(self._W, self.config, copy_classifier=False)
        while len(self._streams) >= self.max_streams:
            old_id, old = self._streams.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old_id, old)
        self._streams[stream_id] = q
        return q

    def __call__(self, stream_id: Hashable, feature: np.ndarray, *, adapt: bool = True) -> np.ndarray:
        return self.get(stream_id)(feature, adapt=adapt)

    def zero_shot(self, feature: np.ndarray) -> np.ndarray:
        return self._zs.zero_shot(feature)

    def reset(self, stream_id: Hashable | None = None) -> None:
        """Reset one stream (kept, caches emptied) or, with no id, drop every stream."""
        if stream_id is None:
            self._streams.clear()
        elif stream_id in self._streams:
            self._streams[stream_id].reset()

    def drop(self, stream_id: Hashable) -> None:
        self._streams.pop(stream_id, None)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._streams))

    def stream_ids(self) -> list[Hashable]:
        """Stream ids from least to most recently used."""
        return list(self._streams)
