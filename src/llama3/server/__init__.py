"""`llama3 serve`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from contextlib import contextmanager

import uvicorn

from .app import DEFAULT_CHAT_MAX_TOKENS, create_app

__all__ = ["DEFAULT_CHAT_MAX_TOKENS", "SIGINT_GRACE", "DrainingServer", "create_app", "serve"]

SIGINT_GRACE = 1.0  # Ctrl-C: the same drain as SIGTERM, within at most this many seconds


def serve(model=None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 64, ctx: int | None = None, cors_origins=None,
          device=None, dtype=None, quantize="auto", log_level: str = "info", check: bool = True,
          shutdown_grace: float = 30.0, load_model=None, **load_options) -> None:
    """Load ``model`` (in a thread: /health answers 503 meanwhile) and serve it until SIGTERM or SIGINT,
    then shut down gracefully: new requests get 503 with Retry-After, those in flight may finish within
    ``shutdown_grace`` seconds (SIGINT: ``SIGINT_GRACE`` at most), the rest end with a final event
    (finish_reason "length"); then the process exits with status 0. A second signal exits at once.
    ``load_options`` go to ``llama3.load`` (threads, kv_dtype, prefill_dtype, ...); ``load_model``: a
    function returning the Llama to serve instead (rank 0 of a tensor-parallel run passes its own)."""
    import logging

    from ..loading import load

    # The event loop shares the GIL with the workers (a template renders in Python) and the engine thread:
    # a 1 ms switch interval instead of 5 lets it answer /health within a few of its turns.
    sys.setswitchinterval(0.001)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def load_default():
        return load(model, device=device, dtype=dtype, quantize=quantize, quiet=True, max_context=ctx, check=check,
                    **load_options)

    app = create_app(load_model or load_default, api_key=api_key, max_batch=max_batch, max_queue=max_queue, ctx=ctx,
                     cors_origins=cors_origins)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    DrainingServer(config, app.state.llama3.drain, shutdown_grace).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with its signal handling replaced: the first SIGTERM or SIGINT runs ``drain(grace)``
    (SIGINT: at most ``SIGINT_GRACE``) and then lets uvicorn close; a second one exits at once. Nothing is
    re-raised afterwards (uvicorn re-raises the signal it caught), so a drained server exits with status 0."""

    def __init__(self, config: uvicorn.Config, drain, grace: float):
        super().__init__(config)
        self.drain, self.grace = drain, grace
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self.draining or self.loop is None:
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        seconds = self.grace if sig == signal.SIGTERM else min(self.grace, SIGINT_GRACE)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain(seconds)))

    async def _drain(self, seconds: float) -> None:
        try:
            await self.drain(seconds)
        finally:
            self.should_exit = True
