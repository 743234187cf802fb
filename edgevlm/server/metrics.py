"""Prometheus text exposition (format 0.0.4), written by hand.

Why not prometheus_client: the server needs a handful of counters, gauges and histograms;
about a hundred lines here avoid one more dependency to install on a Pi and keep the metric
set explicit.  All updates take one lock (they are a few dict operations per request, far below
the cost of a request); :meth:`Metrics.render` reads the process memory from /proc at scrape
time (Linux; elsewhere the peak from ``resource``).

Metrics (prefix ``edgevlm_``): requests_total{route,status}, request_errors_total{route,status},
rejected_total{reason}, request_duration_seconds{route} (histogram), queue_wait_seconds
(histogram), time_to_first_token_seconds (histogram), prompt_tokens_total,
completion_tokens_total, decode_tokens_per_second (last generation), queue_depth,
queue_capacity, in_flight, process_resident_memory_bytes, process_peak_resident_memory_bytes,
uptime_seconds, model_info{model,kind}.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Callable

__all__ = ["Metrics", "rss_bytes"]

# Latency buckets in seconds: edge requests span ~10 ms (an embedding) to minutes (a long reply).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes (peak only where /proc is missing)."""
    try:
        cur = peak = 0
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
        return cur, peak
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return peak, peak


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)   # last = +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, v)] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for b, c in zip((*map(repr, _BUCKETS), "+Inf"), self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {acc}')
        brace = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{brace} {self.sum:.6f}", f"{name}_count{brace} {self.n}"]
        return out


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self, models: dict[str, str], queue_state: Callable[[], tuple[int, int, int]]) -> None:
        """``models``: id -> kind; ``queue_state()`` -> (waiting, capacity, running)."""
        self._lock = threading.Lock()
        self._t0 = time.time()
        self._models = dict(models)
        self._queue_state = queue_state
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.rejected: dict[str, int] = defaultdict(int)
        self.duration: dict[str, _Histogram] = defaultdict(_Histogram)
        self.queue_wait = _Histogram()
        self.ttft = _Histogram()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.decode_tps = 0.0

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.duration[route].observe(seconds)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def waited(self, seconds: float) -> None:
        with self._lock:
            self.queue_wait.observe(seconds)

    def generation(self, prompt_tokens: int, completion_tokens: int, timings: dict[str, float]) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if "ttft_ms" in timings:
                self.ttft.observe(timings["ttft_ms"] / 1e3)
            n, ms = timings.get("decode_tokens", 0), timings.get("decode_ms", 0.0)
            if n and ms > 0:
                self.decode_tps = n / (ms / 1e3)

    def render(self) -> str:
        waiting, capacity, running = self._queue_state()
        rss, peak = rss_bytes()
        out: list[str] = []

        def head(name: str, kind: str, help_: str) -> None:
            out.extend([f"# HELP edgevlm_{name} {help_}", f"# TYPE edgevlm_{name} {kind}"])

        def scalar(name: str, kind: str, help_: str, value: object) -> None:  # an unlabelled sample
            head(name, kind, help_)
            out.append(f"edgevlm_{name} {value}")

        with self._lock:
            head("requests_total", "counter", "HTTP requests answered, by route and status code")
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'edgevlm_requests_total{{route="{_esc(route)}",status="{status}"}} {n}')
            head("request_errors_total", "counter", "HTTP requests answered with a 4xx/5xx status")
            for (route, status), n in sorted(self.requests.items()):
                if status >= 400:
                    out.append(f'edgevlm_request_errors_total{{route="{_esc(route)}",status="{status}"}} {n}')
            head("rejected_total", "counter", "requests refused before reaching the model (queue full, shutdown)")
            for reason, n in sorted(self.rejected.items()):
                out.append(f'edgevlm_rejected_total{{reason="{_esc(reason)}"}} {n}')
            head("request_duration_seconds", "histogram", "time from request to last byte, by route")
            for route, h in sorted(self.duration.items()):
                out += h.lines("edgevlm_request_duration_seconds", f'route="{_esc(route)}"')
            head("queue_wait_seconds", "histogram", "time a request waited for the model worker")
            out += self.queue_wait.lines("edgevlm_queue_wait_seconds", "")
            head("time_to_first_token_seconds", "histogram", "image encode + prefill + first token")
            out += self.ttft.lines("edgevlm_time_to_first_token_seconds", "")
            scalar("prompt_tokens_total", "counter", "prompt tokens processed (images included)", self.prompt_tokens)
            scalar("completion_tokens_total", "counter", "tokens generated", self.completion_tokens)
            scalar("decode_tokens_per_second", "gauge", "decode speed of the last generation", f"{self.decode_tps:.3f}")
        scalar("queue_depth", "gauge", "requests waiting for the model worker (not counting the running one)", waiting)
        scalar("queue_capacity", "gauge", "--max-queue: waiting requests beyond this get a 503", capacity)
        scalar("in_flight", "gauge", "requests the model worker is running (0 or 1)", running)
        scalar("process_resident_memory_bytes", "gauge", "resident set size of the server process", rss)
        scalar("process_peak_resident_memory_bytes", "gauge", "peak resident set size since start", peak)
        scalar("uptime_seconds", "gauge", "seconds since the server started", f"{time.time() - self._t0:.1f}")
        head("model_info", "gauge", "models served (value 1)")
        for mid, kind in self._models.items():
            out.append(f'edgevlm_model_info{{model="{_esc(mid)}",kind="{kind}"}} 1')
        return "\n".join(out) + "\n"
