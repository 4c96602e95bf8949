"""Continuous batching: one thread runs every decode step for all active sequences together.

Each sequence owns one row ("slot") of a KV cache of ``max_batch`` rows × ``ctx`` positions, so
admission is KV-cache accounting: a request is admitted when a slot is free, and a slot holds
any prompt plus completion that fits the context. New requests are prefilled into their slot
between steps; finished or cancelled ones leave at once and free their slot. A decode step runs
rows 0..highest busy slot together (each at its own position); free rows in between get a
dummy token that writes only into their own, unused row.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generation import Llama, Step, _Sequence
from ..model import KVCache
from ..sampling import SamplingParams

log = logging.getLogger("llama3.server")


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[object], None]  # receives Step records, then None at the end (or an Exception)
    ignore_eos: bool = False  # keep going past end-of-turn tokens (benchmarks)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


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
                 metrics: Metrics | None = None):
        self.llm, self.max_batch, self.max_queue = llm, max_batch, max_queue
        self.ctx = min(ctx or llm.generator.context, llm.args.max_seq_len)
        self.metrics = metrics or Metrics()
        self.pending: queue.Queue[Request] = queue.Queue()
        self.slots: list[tuple[Request, _Sequence] | None] = [None] * max_batch
        self.positions = [0] * max_batch
        self.cache = KVCache(llm.args, max_batch_size=max_batch, max_seq_len=self.ctx, dtype=llm.dtype,
                             device=llm.device)
        # only the busy slots, each at its own cache row; one C call per step where the model qualifies
        self.decode = llm.generator.decoder()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="llama3-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------- requests
    def submit(self, req: Request) -> None:
        if self.pending.qsize() >= self.max_queue:
            raise QueueFull()
        self.pending.put(req)
        self.metrics.queue_depth = self.pending.qsize()
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    # --------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self.stopping:
            admitted = self._admit()
            busy = [i for i, s in enumerate(self.slots) if s is not None]
            if not busy and not admitted:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                self._step(busy)
            except Exception as e:  # noqa: BLE001 - a failure ends the affected requests, not the server
                log.exception("decode step failed")
                for i in busy:
                    self._finish(i, error=e)

    def _admit(self) -> bool:
        admitted = False
        while None in self.slots and not self.pending.empty():
            req = self.pending.get()
            self.metrics.queue_depth = self.pending.qsize()
            if req.cancelled.is_set():
                req.emit(None)
                continue
            slot = self.slots.index(None)
            try:
                self._prefill(slot, req)
                admitted = True
            except Exception as e:  # noqa: BLE001
                log.exception("prefill failed")
                req.emit(e)
        return admitted

    def _prefill(self, slot: int, req: Request) -> None:
        llm = self.llm
        stop_ids = set() if req.ignore_eos else llm.tokenizer.stop_ids
        seq = _Sequence(slot, req.prompt, req.params, llm.tokenizer, stop_ids, llm.args.vocab_size)
        logits = llm.generator.prefill(req.prompt, self.cache.rows(slot, slot + 1)).float().cpu()
        self.slots[slot] = (req, seq)
        self.positions[slot] = len(req.prompt)
        self.metrics.prompt_tokens += len(req.prompt)
        self.metrics.active = sum(s is not None for s in self.slots)
        self._emit_token(slot, logits)

    def _emit_token(self, slot: int, logits: torch.Tensor) -> None:
        """Choose, account and send one token for the sequence in ``slot``."""
        req, seq = self.slots[slot]
        if req.cancelled.is_set():
            self.metrics.cancelled += 1
            self._finish(slot)
            return
        token, logprob, top = seq.choose(logits)
        at_end = self.positions[slot] + 1 >= self.ctx
        text, reason = seq.feed(token, at_end)
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.observe("llama3_time_to_first_token_seconds", now - req.arrived)
        self.metrics.completion_tokens += 1
        req.emit(Step(token, text, logprob, top, reason, 0))
        seq.last_token = token
        if reason is not None:
            self._finish(slot)

    def _finish(self, slot: int, error: Exception | None = None) -> None:
        entry = self.slots[slot]
        if entry is None:
            return
        req, _ = entry
        self.slots[slot] = None
        self.metrics.active = sum(s is not None for s in self.slots)
        req.emit(error)  # None = done

    def _step(self, busy: list[int]) -> None:
        # Cancelled sequences leave before the step: their slot is free for the next request.
        for i in busy:
            req, _ = self.slots[i]
            if req.cancelled.is_set():
                self.metrics.cancelled += 1
                self._finish(i)
        busy = [i for i in busy if self.slots[i] is not None]
        if not busy:
            return
        started = time.perf_counter()
        out = self.decode([self.slots[i][1].last_token for i in busy], [self.positions[i] for i in busy],
                          self.cache, rows=busy)
        logits = {i: out[j] for j, i in enumerate(busy)}
        elapsed = time.perf_counter() - started
        for i in busy:
            self.positions[i] += 1
            self.metrics.observe("llama3_time_per_output_token_seconds", elapsed)
            self._emit_token(i, logits[i])
