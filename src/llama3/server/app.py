"""The OpenAI-compatible HTTP API on FastAPI: request models at the edge, errors in OpenAI's shape.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming or not), GET /v1/models,
GET /health, GET /metrics, POST /tokenize, POST /detokenize.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import SamplingParams
from .scheduler import Job, Metrics, QueueFull, Scheduler

log = logging.getLogger("llama3.server")
MAX_BODY_BYTES = 4 * 1024 * 1024


# ------------------------------------------------------------------------------ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


# ------------------------------------------------------------------------------ requests
class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    user: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "ipython", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Base):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @model_validator(mode="after")
    def _nonempty(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    content: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]


# ------------------------------------------------------------------------------ the app
class State:
    def __init__(self):
        self.llm = None
        self.scheduler: Scheduler | None = None
        self.model_id = ""
        self.error: str | None = None
        self.metrics = Metrics()


def create_app(load_model, *, api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
               ctx: int | None = None, cors_origins: list[str] | None = None, background: bool = True) -> FastAPI:
    """``load_model()`` returns a Llama; it runs in a thread so /health answers 503 meanwhile."""
    app = FastAPI(title="llama3", docs_url=None, redoc_url=None)
    state = State()
    app.state.llama3 = state

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    def do_load():
        try:
            llm = load_model()
            state.scheduler = Scheduler(llm, max_batch=max_batch, max_queue=max_queue, ctx=ctx, metrics=state.metrics)
            state.model_id = _model_id(llm)
            state.llm = llm
            log.info("model %s ready; runs as: %s", state.model_id, llm.describe())
        except Exception as e:  # noqa: BLE001
            state.error = f"{type(e).__name__}: {e}"
            log.exception("loading the model failed")

    if background:
        threading.Thread(target=do_load, name="llama3-load", daemon=True).start()
    else:
        do_load()

    @app.on_event("shutdown")
    def _shutdown():
        if state.scheduler:
            state.scheduler.stop()

    # ---------------------------------------------------------------- middleware
    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _counted(state, path, error_response(APIError(
                413, f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}", code="body_too_large")))
        if api_key and path not in ("/health",) and request.method != "OPTIONS":
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {api_key}":
                return _counted(state, path, error_response(APIError(
                    401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    "authentication_error", code="invalid_api_key")))
        response = await call_next(request)
        return _counted(state, path, response)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                                           "invalid_request_error", None, "invalid_json"), status_code=400)
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        param = ".".join(loc) or None
        message = err.get("msg", "invalid request")
        return JSONResponse(error_body(f"{param + ': ' if param else ''}{message}", "invalid_request_error", param,
                                       "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"unknown route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(message, type_, None, None), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    def ready():
        if state.llm is None:
            raise APIError(503, state.error or "the model is still loading", "service_unavailable",
                           code="model_loading", headers={"Retry-After": "5"})
        return state.llm

    def check_model(name: str | None):
        if name and name not in (state.model_id, "default"):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_id!r}",
                           "not_found_error", "model", "model_not_found")

    # ---------------------------------------------------------------- endpoints
    @app.get("/health")
    def health():
        if state.llm is None:
            status = "error" if state.error else "loading"
            return JSONResponse({"status": status, "error": state.error}, status_code=503)
        return {"status": "ok", "model": state.model_id}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        ready()
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                            "owned_by": "llama3"}]}

    @app.post("/tokenize")
    def tokenize(body: TokenizeRequest):
        llm = ready()
        if body.messages:
            _, ids = llm.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        else:
            text = body.content if body.content is not None else body.prompt
            if text is None:
                raise APIError(400, "give 'content' (or 'prompt' or 'messages')", param="content")
            ids = llm.encode_prompt(text) if body.add_special else llm.tokenizer.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.scheduler.ctx}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeRequest):
        llm = ready()
        bad = [t for t in body.tokens if not 0 <= t < llm.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {llm.tokenizer.vocab_size})",
                           param="tokens")
        return {"content": llm.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        llm = ready()
        check_model(body.model)
        _log_unknown(body, "/v1/chat/completions")
        if llm.chat_format is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            _, ids = llm.chat_prompt(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        top = body.top_logprobs if body.logprobs else None
        params = _params(body, body.max_completion_tokens or body.max_tokens, top or 0)
        return await _serve(request, "chat.completion", [ids], params, body, logprobs=body.logprobs)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        llm = ready()
        check_model(body.model)
        _log_unknown(body, "/v1/completions")
        prompts = _prompts(body.prompt)
        ids = []
        for p in prompts:
            try:
                ids.append(llm.encode_prompt(p))
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
        params = _params(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs or 0)
        return await _serve(request, "text_completion", ids, params, body, logprobs=body.logprobs is not None,
                            echo_prompts=prompts if body.echo else None)

    # ---------------------------------------------------------------- generation
    def _params(body: _Base, max_tokens: int | None, top: int) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        try:
            return SamplingParams(max_new_tokens=max_tokens or state.scheduler.ctx, temperature=body.temperature,
                                  top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
                                  stop=stop, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty,
                                  repetition_penalty=body.repetition_penalty, logprobs=top)
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param={"max_new_tokens": "max_tokens"}.get(param, param)) from None

    async def _serve(request: Request, kind: str, prompts: list[list[int]], params: SamplingParams, body: _Base,
                     logprobs: bool, echo_prompts=None):
        sched = state.scheduler
        for p in prompts:
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt")
            if len(p) >= sched.ctx:
                raise APIError(400, f"the prompt has {len(p)} tokens, but the context holds {sched.ctx} "
                                    "(including at least one new token)", param="messages" if kind ==
                               "chat.completion" else "prompt", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        jobs = []
        for i, p in enumerate(prompts):
            for j in range(body.n):
                q: asyncio.Queue = asyncio.Queue()
                seed = params.seed + j if params.seed is not None and body.n > 1 else params.seed
                job_params = SamplingParams(**{**params.__dict__, "seed": seed,
                                               "max_new_tokens": min(params.max_new_tokens, sched.ctx - len(p))})
                job = Job(p, job_params, lambda item, q=q: loop.call_soon_threadsafe(q.put_nowait, item),
                          ignore_eos=body.ignore_eos)
                jobs.append((len(jobs), p, job, q))
        try:
            for _, _, job, _ in jobs:
                sched.submit(job)
        except QueueFull:
            for _, _, job, _ in jobs:
                job.cancelled.set()
            raise APIError(429, f"the server is busy: {sched.max_queue} requests are already waiting; retry later",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(request, kind, rid, created, jobs, logprobs, include_usage, body.n),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = await asyncio.gather(*[_collect(q) for *_, q in jobs])
        except asyncio.CancelledError:
            for _, _, job, _ in jobs:
                job.cancelled.set()
            raise
        choices, completion_tokens = [], 0
        for (index, p, _, _), (steps, error) in zip(jobs, results):
            if error is not None:
                raise APIError(500, f"generation failed: {error}", "server_error")
            completion_tokens += len(steps)
            text = "".join(s.text for s in steps)
            if echo_prompts is not None:
                text = state.llm.tokenizer.decode(p) + text
            reason = steps[-1].finish_reason if steps else "length"
            choices.append(_choice(kind, index, text, reason, steps if logprobs else None))
        return {"id": rid, "object": kind, "created": created, "model": state.model_id, "choices": choices,
                "usage": _usage(prompts, jobs, completion_tokens, body.n)}

    async def _collect(q: asyncio.Queue):
        steps = []
        while True:
            item = await q.get()
            if item is None:
                return steps, None
            if isinstance(item, Exception):
                return steps, item
            steps.append(item)

    async def _stream(request, kind, rid, created, jobs, logprobs, include_usage, n):
        obj = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index, q):
            while True:
                item = await q.get()
                await merged.put((index, item))
                if item is None or isinstance(item, Exception):
                    return

        tasks = [asyncio.create_task(pump(index, q)) for index, _, _, q in jobs]
        open_jobs = len(jobs)
        counts = [0] * len(jobs)
        try:
            if kind == "chat.completion":
                for index, *_ in jobs:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": state.model_id,
                                "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
            while open_jobs:
                try:
                    index, item = await asyncio.wait_for(merged.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError() from None
                    continue
                if item is None or isinstance(item, Exception):
                    open_jobs -= 1
                    if isinstance(item, Exception):
                        yield _sse(error_body(f"generation failed: {item}", "server_error"))
                    continue
                counts[index] += 1
                chunk = _chunk(kind, index, item, logprobs)
                yield _sse({"id": rid, "object": obj, "created": created, "model": state.model_id,
                            "choices": [chunk]})
            if include_usage:
                prompts = [p for i, (_, p, _, _) in enumerate(jobs) if i % n == 0]
                yield _sse({"id": rid, "object": obj, "created": created, "model": state.model_id, "choices": [],
                            "usage": _usage(prompts, jobs, sum(counts), n)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free every slot still held
            for _, _, job, _ in jobs:
                job.cancelled.set()
            for t in tasks:
                t.cancel()

    def _choice(kind, index, text, reason, steps):
        lp = _logprobs(kind, steps) if steps is not None else None
        if kind == "chat.completion":
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                    "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

    def _chunk(kind, index, step, logprobs):
        lp = _logprobs(kind, [step]) if logprobs and step.text is not None else None
        if kind == "chat.completion":
            return {"index": index, "delta": {"content": step.text} if step.text else {}, "logprobs": lp,
                    "finish_reason": step.finish_reason}
        return {"index": index, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason}

    def _logprobs(kind, steps):
        dec = state.llm.tokenizer.decode
        if kind == "chat.completion":
            return {"content": [{"token": dec([s.token_id]), "logprob": s.logprob,
                                 "bytes": list(state.llm.tokenizer.token_bytes(s.token_id)),
                                 "top_logprobs": [{"token": dec([t]), "logprob": v,
                                                   "bytes": list(state.llm.tokenizer.token_bytes(t))}
                                                  for t, v in s.top_logprobs.items()]} for s in steps]}
        return {"tokens": [dec([s.token_id]) for s in steps], "token_logprobs": [s.logprob for s in steps],
                "top_logprobs": [{dec([t]): v for t, v in s.top_logprobs.items()} for s in steps],
                "text_offset": []}

    return app


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _usage(prompts, jobs, completion_tokens: int, n: int) -> dict:
    """OpenAI's usage block; ``cached_tokens``: prompt tokens whose keys and values came from the cache (the
    first of each prompt's n choices)."""
    prompt_tokens = sum(len(p) for p in prompts)
    cached = sum(job.request.cached_tokens for i, (_, _, job, _) in enumerate(jobs) if i % n == 0 and job.request)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _counted(state: State, path: str, response):
    endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                                "/tokenize", "/detokenize") else "other"
    state.metrics.count_request(endpoint, response.status_code)
    return response


def _log_unknown(body: BaseModel, endpoint: str) -> None:
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        log.info("%s: ignoring unknown fields %s", endpoint, extra)


def _model_id(llm) -> str:
    from pathlib import Path

    p = Path(llm.path)
    return p.stem if p.suffix == ".gguf" else p.name
