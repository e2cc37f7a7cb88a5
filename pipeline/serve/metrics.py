"""The server's counters and histograms, written in Prometheus's text format by hand (the
format is a few lines per series; a client library would be one more dependency).

Updated from the event loop and from the worker threads, hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)

Labels = tuple[tuple[str, str], ...]


def escape(value: str) -> str:
    """A label value as the text format quotes it."""
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def label_text(labels: Labels, extra: Labels = ()) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in pairs) + "}"


def number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help, self.values = name, help_text, {}

    def inc(self, labels: Labels, amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def lines(self) -> list[str]:
        head = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        return head + [f"{self.name}{label_text(k)} {number(v)}"
                       for k, v in sorted(self.values.items())]


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.series: dict[Labels, list] = {}  # labels -> [count per bucket, sum, count]

    def observe(self, labels: Labels, value: float) -> None:
        counts, total, n = self.series.get(labels) or [[0] * len(self.buckets), 0.0, 0]
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        self.series[labels] = [counts, total + value, n + 1]

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, (counts, total, n) in sorted(self.series.items()):
            for bound, count in zip(self.buckets, counts, strict=True):  # already cumulative
                out.append(f"{self.name}_bucket{label_text(labels, (('le', number(bound)),))}"
                           f" {count}")
            out.append(f"{self.name}_bucket{label_text(labels, (('le', '+Inf'),))} {n}")
            out.append(f"{self.name}_sum{label_text(labels)} {number(total)}")
            out.append(f"{self.name}_count{label_text(labels)} {n}")
        return out


def gauge_lines(name: str, help_text: str, values: Mapping[Labels, float]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"] + [
        f"{name}{label_text(k)} {number(v)}" for k, v in sorted(values.items())]


class Metrics:
    """What /metrics reports: requests, their latency, batch sizes, reloads; the queue
    depths are read when the page is written."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = Counter("pipeline_requests_total", "HTTP requests answered, by route "
                                "and status.")
        self.latency = Histogram("pipeline_request_duration_seconds", "Time from request to "
                                 "response, by route.", LATENCY_BUCKETS)
        self.batch_requests = Histogram("pipeline_batch_requests", "Requests answered by one "
                                        "forward pass, by index.", SIZE_BUCKETS)
        self.batch_texts = Histogram("pipeline_batch_texts", "Texts embedded in one forward "
                                     "pass, by index.", SIZE_BUCKETS)
        self.reloads = Counter("pipeline_index_reloads_total", "Attempts to load a changed "
                               "index folder, by index and outcome.")

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests.inc((("route", route), ("status", str(status))))
            self.latency.observe((("route", route),), seconds)

    def observe_batch(self, index: str, requests: int, texts: int) -> None:
        with self.lock:
            self.batch_requests.observe((("index", index),), requests)
            self.batch_texts.observe((("index", index),), texts)

    def observe_reload(self, index: str, outcome: str) -> None:
        with self.lock:
            self.reloads.inc((("index", index), ("outcome", outcome)))

    def render(self, queue_depths: Mapping[str, int]) -> str:
        depths = {(("index", name),): depth for name, depth in queue_depths.items()}
        with self.lock:
            lines = [*self.requests.lines(), *self.latency.lines(),
                     *self.batch_requests.lines(), *self.batch_texts.lines(),
                     *self.reloads.lines(),
                     *gauge_lines("pipeline_queue_depth", "Requests waiting for a batch, by "
                                  "index.", depths)]
        return "\n".join(lines) + "\n"
