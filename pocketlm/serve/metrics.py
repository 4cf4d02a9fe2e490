"""The few Prometheus metrics the server exposes at /metrics, in the text exposition format."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = Counter()  # (endpoint, status code) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency = Histogram()
        self.ttft = Histogram()

    def request_done(self, endpoint: str, status: int):
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def generation_done(self, req):
        """Token counts and timings of a finished engine request."""
        with self._lock:
            self.prompt_tokens += len(req.prompt_ids)
            self.completion_tokens += len(req.output_ids)
            if req.t_done is not None:
                self.latency.observe(req.t_done - req.t_submit)
            if req.t_first_token is not None:
                self.ttft.observe(req.t_first_token - req.t_submit)

    def render(self, queue_depth: int, running: int, slots: int) -> str:
        with self._lock:
            lines = ["# HELP pocketlm_requests_total HTTP requests by endpoint and status code.",
                     "# TYPE pocketlm_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'pocketlm_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
            lines += ["# HELP pocketlm_prompt_tokens_total Prompt tokens processed.",
                      "# TYPE pocketlm_prompt_tokens_total counter",
                      f"pocketlm_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP pocketlm_completion_tokens_total Tokens generated.",
                      "# TYPE pocketlm_completion_tokens_total counter",
                      f"pocketlm_completion_tokens_total {self.completion_tokens}",
                      "# HELP pocketlm_request_latency_seconds Time from submission to the last token.",
                      "# TYPE pocketlm_request_latency_seconds histogram",
                      *self.latency.lines("pocketlm_request_latency_seconds"),
                      "# HELP pocketlm_time_to_first_token_seconds Time from submission to the first token.",
                      "# TYPE pocketlm_time_to_first_token_seconds histogram",
                      *self.ttft.lines("pocketlm_time_to_first_token_seconds"),
                      "# HELP pocketlm_queue_depth Requests waiting for a KV cache slot.",
                      "# TYPE pocketlm_queue_depth gauge",
                      f"pocketlm_queue_depth {queue_depth}",
                      "# HELP pocketlm_running_requests Requests being decoded.",
                      "# TYPE pocketlm_running_requests gauge",
                      f"pocketlm_running_requests {running}",
                      "# HELP pocketlm_kv_slots KV cache slots (the most requests decoded at once).",
                      "# TYPE pocketlm_kv_slots gauge",
                      f"pocketlm_kv_slots {slots}"]
        return "\n".join(lines) + "\n"
