"""The server's side of continuous batching: one thread drives the engine (``llama3.engine.Engine``), the
same loop the Python API and bench use. HTTP handlers ``submit`` jobs from the event loop; each engine step
admits new requests (reusing any cached prompt prefix), prefills, decodes every running sequence by one
token, and the scheduler hands each Step to its job. A job whose client went away is cancelled at the next
step and its cache blocks are freed at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import Engine, Request
from ..generation import Llama
from ..sampling import SamplingParams

log = logging.getLogger("llama3.server")


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


class ShuttingDown(Exception):
    """The server is shutting down and admits no new job."""


class _Ended:
    """What a job receives instead of its last Step when the server ends it early (shutdown)."""

    def __repr__(self) -> str:
        return "ENDED"


ENDED = _Ended()


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[object], None]  # receives Step records, then None at the end (or ENDED, or an Exception)
    ignore_eos: bool = False  # keep going past end-of-turn tokens (benchmarks)
    processors: tuple = ()  # logits processors for this sequence (logit_bias, a grammar), in order
    prompt_logprobs: int | None = None  # score the prompt too (echo with logprobs): Request.prompt_scores
    generate: bool = True  # False: score the prompt only (echo with max_tokens=0)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    request: Request | None = None  # the engine's record (``cached_tokens`` once admitted)
    ended: bool = False  # cancelled by the server (shutdown), not by its client


class Metrics:
    """Prometheus text exposition, by hand: counters, gauges and two histograms."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.queue_depth = 0
        self.active = 0
        self.cancelled = 0
        self.cached_tokens = 0
        self.set_aside = 0
        self.kv_blocks_in_use = 0
        self.kv_resident_bytes = 0
        self.hist = {"llama3_time_to_first_token_seconds": [0] * (len(self.BUCKETS) + 1) + [0.0],
                     "llama3_time_per_output_token_seconds": [0] * (len(self.BUCKETS) + 1) + [0.0]}

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            h = self.hist[name]
            for i, b in enumerate(self.BUCKETS):
                if value <= b:
                    h[i] += 1
            h[len(self.BUCKETS)] += 1  # +Inf, which is also the count
            h[-1] += value

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP llama3_requests_total Requests by endpoint and HTTP status.",
                     "# TYPE llama3_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'llama3_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            for name, kind, value, text in [
                ("llama3_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens processed."),
                ("llama3_completion_tokens_total", "counter", self.completion_tokens, "Tokens generated."),
                ("llama3_cancelled_total", "counter", self.cancelled, "Sequences cancelled by a disconnect."),
                ("llama3_prompt_tokens_cached_total", "counter", self.cached_tokens,
                 "Prompt tokens whose keys and values were reused from the cache."),
                ("llama3_set_aside_total", "counter", self.set_aside,
                 "Sequences set aside for lack of KV-cache memory (and recomputed)."),
                ("llama3_kv_cache_blocks_in_use", "gauge", self.kv_blocks_in_use, "KV-cache blocks held by sequences."),
                ("llama3_kv_cache_resident_bytes", "gauge", self.kv_resident_bytes,
                 "Memory the KV cache holds now (blocks in use or kept for prefix reuse)."),
                ("llama3_queue_depth", "gauge", self.queue_depth, "Requests waiting for a slot."),
                ("llama3_active_sequences", "gauge", self.active, "Sequences being generated."),
            ]:
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for name, h in self.hist.items():
                lines += [f"# TYPE {name} histogram"]
                for i, b in enumerate(self.BUCKETS):
                    lines.append(f'{name}_bucket{{le="{b}"}} {h[i]}')
                lines += [f'{name}_bucket{{le="+Inf"}} {h[len(self.BUCKETS)]}',
                          f"{name}_sum {h[-1]:.6f}", f"{name}_count {h[len(self.BUCKETS)]}"]
            return "\n".join(lines) + "\n"


class Scheduler:
    def __init__(self, llm: Llama, max_batch: int = 8, max_queue: int = 64, ctx: int | None = None,
                 metrics: Metrics | None = None, **engine_options):
        self.llm, self.max_batch, self.max_queue = llm, max_batch, max_queue
        self.engine = Engine(llm.model, llm.tokenizer, max_batch=max_batch, context=ctx or llm.generator.context,
                             **{**getattr(llm, "engine_options", {}), **engine_options})
        self.ctx = self.engine.context
        self.metrics = metrics or Metrics()
        self.jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.closed = False  # end_all() was called: no new jobs
        self.thread = threading.Thread(target=self._loop, name="llama3-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------- requests
    def submit(self, job: Job) -> None:
        if self.closed:
            raise ShuttingDown()
        if self.engine.waiting >= self.max_queue:
            raise QueueFull()
        stop_ids = set() if job.ignore_eos else None
        job.request = Request(job.prompt, job.params, stop_ids, job.processors,
                              prompt_logprobs=job.prompt_logprobs, generate=job.generate)
        with self._lock:
            self.jobs[self.engine.add(job.request)] = job
        self.metrics.queue_depth = self.engine.waiting
        self.wake.set()

    def cancel(self, job: Job) -> None:
        """The client went away: the loop cancels the job at once, and the engine frees its cache blocks at
        its next step (any thread; a no-op for a finished job)."""
        if not job.cancelled.is_set():
            job.cancelled.set()
            self.wake.set()

    def end_all(self) -> int:
        """Shutdown: admit no more jobs and end every job in flight now; each receives ENDED (so its client
        gets a proper last event) and its blocks are freed. Returns how many were ended."""
        self.closed = True
        with self._lock:
            ended = list(self.jobs.values())
        for job in ended:
            job.ended = True
            self.cancel(job)
        return len(ended)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    # --------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self.stopping:
            with self._lock:
                gone = [rid for rid, job in self.jobs.items() if job.cancelled.is_set()]
            for rid in gone:  # the client went away (or shutdown): the engine frees its blocks at this step
                ended = self.jobs[rid].ended
                self.engine.cancel(rid)
                self._finish(rid, ENDED if ended else None)
                self.metrics.cancelled += not ended
            if not self.engine.has_work():
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                started = time.perf_counter()
                steps = self.engine.step()
                elapsed = time.perf_counter() - started
            except Exception as e:  # noqa: BLE001 - a failure ends the requests in flight, not the server
                log.exception("engine step failed")
                self.engine.abort()
                for rid in list(self.jobs):
                    self._finish(rid, e)
                continue
            for step in steps:
                self._deliver(step, elapsed)
            self._update_gauges()

    def _deliver(self, step, elapsed: float) -> None:
        job = self.jobs.get(step.request_id)
        if job is None:  # cancelled meanwhile
            return
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.observe("llama3_time_to_first_token_seconds", now - job.arrived)
            self.metrics.prompt_tokens += len(job.prompt)
            self.metrics.cached_tokens += job.request.cached_tokens
        else:
            self.metrics.observe("llama3_time_per_output_token_seconds", elapsed)
        self.metrics.completion_tokens += step.token_id >= 0  # a score-only request's last Step holds no token
        job.emit(step)
        if step.finish_reason is not None:
            self._finish(step.request_id)

    def _finish(self, rid: int, end: object = None) -> None:
        """The job's last message: None (done), ENDED or the exception that ended it."""
        with self._lock:
            job = self.jobs.pop(rid, None)
        if job is not None:
            job.emit(end)

    def _update_gauges(self) -> None:
        m, e = self.metrics, self.engine
        m.queue_depth, m.active, m.set_aside = e.waiting, e.active, e.set_aside
        m.kv_blocks_in_use, m.kv_resident_bytes = e.cache.blocks_in_use, e.cache.resident_bytes()
