"""`llama3 serve`: an OpenAI-compatible HTTP server with continuous batching."""

from .app import create_app

__all__ = ["create_app", "serve"]


def serve(model=None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 64, ctx: int | None = None, cors_origins=None,
          device=None, dtype=None, quantize="auto", log_level: str = "info", check: bool = True,
          load_model=None, **load_options) -> None:
    """Load ``model`` (in a thread: /health answers 503 meanwhile) and serve it. ``load_options`` go to
    ``llama3.load`` (threads, kv_dtype, prefill_dtype, ...). ``load_model``: a function returning the Llama
    to serve instead (rank 0 of a tensor-parallel run passes its own)."""
    import logging

    import uvicorn

    from ..loading import load

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def load_default():
        return load(model, device=device, dtype=dtype, quantize=quantize, quiet=True, max_context=ctx, check=check,
                    **load_options)

    app = create_app(load_model or load_default, api_key=api_key, max_batch=max_batch, max_queue=max_queue, ctx=ctx,
                     cors_origins=cors_origins)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
