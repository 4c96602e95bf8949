"""The OpenAI-compatible HTTP API on FastAPI: request models at the edge, errors in OpenAI's shape.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming or not), GET /v1/models,
GET /v1/models/{id}, POST /v1/embeddings, GET /health, GET /metrics, POST /tokenize, POST /detokenize,
GET /tokenizer_info (what lm-evaluation-harness's remote tokenizer reads, as vLLM's).

Beyond plain generation (see "issue 14" below): ``tools`` / ``tool_choice`` on chat (Llama 3.1+'s
JSON calls or the model template's), ``response_format`` (``json_object``, ``json_schema``) and the
extensions ``grammar`` (GBNF or Lark) and ``regex`` by constrained decoding, ``logit_bias``,
``echo`` with prompt logprobs (``max_tokens=0`` scores the prompt only) and ``text_offset``.

Sampling fields a request leaves out take the model's defaults (``llm.sampling_defaults``: its
``generation_config.json`` or GGUF ``general.sampling.*``), else the project's (llama.cpp's:
temperature 0.8, top_k 40, top_p 0.95, min_p 0.05), not OpenAI's temperature 1 and top_p 1, under
which small models ramble. ``sampling_defaults`` below is the one place that decides.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..embeddings import embed
from ..processors import LogitBias
from ..sampling import SamplingParams
from ..structured import GrammarConstraint, GrammarError
from ..tools import (ToolCallParser, check_tool_choice, check_tools, parse_tool_calls, render_tools_prompt,
                     tool_call_constraint)
from .scheduler import Job, Metrics, QueueFull, Scheduler

log = logging.getLogger("llama3.server")
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


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
    # left out (None): sampling_defaults(llm)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False
    user: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # issue 14: constraints on what may be sampled (``_processors_for``)
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    grammar: str | None = None  # extension: output in a GBNF or Lark grammar (llama.cpp's "grammar")
    regex: str | None = None  # extension: output matching a regex (vLLM's "guided_regex")


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
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None  # accepted; Llama 3's format writes one call per reply


class CompletionRequest(_Base):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo: score the prompt, generate nothing
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
    add_special_tokens: bool | None = None  # vLLM's name for add_special (lm-evaluation-harness sends it)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)  # only the model's own width is offered
    pooling: Literal["mean", "last"] = "mean"  # extension: how the final hidden states become one vector
    user: str | None = None

    @model_validator(mode="after")
    def _nonempty(self):
        if isinstance(self.input, list) and (not self.input or len(self.input) > MAX_EMBEDDING_INPUTS):
            raise ValueError(f"input must hold 1 to {MAX_EMBEDDING_INPUTS} texts")
        return self


# ------------------------------------------------------------------------------ the app
class State:
    def __init__(self):
        self.llm = None
        self.scheduler: Scheduler | None = None
        self.model_id = ""
        self.error: str | None = None
        self.metrics = Metrics()
        self.embed_lock = asyncio.Lock()


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

    # ---------------------------------------------------------------- issue 14: models/{id}, embeddings, tokenizer
    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        ready()
        check_model(model_id)
        return {"id": state.model_id, "object": "model", "created": 0, "owned_by": "llama3"}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        """One vector per input from the final hidden states (after the last RMSNorm): the mean over the
        input's tokens (``pooling="mean"``, the default) or the last token's (``"last"``), scaled to unit
        length. A decoder is no trained embedding model: similarity search works only roughly with these."""
        llm = ready()
        check_model(body.model)
        if body.dimensions is not None and body.dimensions != llm.args.dim:
            raise APIError(400, f"dimensions: this model's embeddings have {llm.args.dim} dimensions, "
                                f"got {body.dimensions}", param="dimensions")

        def run():
            ids = [llm.encode_prompt(t) for t in _prompts(body.input)]
            return embed(llm, ids, body.pooling), [len(i) for i in ids]

        try:
            async with state.embed_lock:  # one batch at a time beside the engine's thread, off the event loop
                vectors, counts = await asyncio.to_thread(run)
        except ValueError as e:
            raise APIError(400, str(e), param="input") from None
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": state.model_id,
                "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}}

    @app.get("/tokenizer_info")
    def tokenizer_info():
        """What clients that tokenize through the server read (vLLM's endpoint; lm-evaluation-harness's
        remote tokenizer): the special tokens by name and the chat template."""
        llm = ready()
        tok = llm.tokenizer
        name = {i: n for n, i in tok.special_tokens.items()}
        eos = tok.eos_id if tok.eos_id is not None else min(tok.stop_ids, default=None)
        return {"eos_token": name.get(eos), "bos_token": name.get(tok.bos_id), "pad_token": None,
                "add_bos_token": tok.add_bos, "vocab_size": tok.vocab_size, "model_max_length": state.scheduler.ctx,
                "chat_template": getattr(llm.chat_format, "template_text", None)}

    @app.post("/tokenize")
    def tokenize(body: TokenizeRequest):
        llm = ready()
        if body.messages:
            _, ids = llm.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        else:
            text = body.content if body.content is not None else body.prompt
            if text is None:
                raise APIError(400, "give 'content' (or 'prompt' or 'messages')", param="content")
            special = body.add_special if body.add_special_tokens is None else body.add_special_tokens
            ids = llm.encode_prompt(text) if special else llm.tokenizer.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.scheduler.ctx}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeRequest):
        llm = ready()
        bad = [t for t in body.tokens if not 0 <= t < llm.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {llm.tokenizer.vocab_size})",
                           param="tokens")
        text = llm.tokenizer.decode(body.tokens)
        return {"content": text, "prompt": text}  # "prompt": vLLM's name (lm-evaluation-harness reads it)

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
            ids = _tools_prompt(llm, body)
            if ids is None:
                _, ids = llm.chat_prompt(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        top = body.top_logprobs if body.logprobs else None
        params = _params(body, body.max_completion_tokens or body.max_tokens, top or 0)
        extras = Extras(await asyncio.to_thread(_processors_for, body, llm), tools=_parses_tool_calls(body))
        return await _serve(request, "chat.completion", [ids], params, body, logprobs=body.logprobs, extras=extras)

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
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens")
        params = _params(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs or 0)
        scored = body.logprobs if body.echo and body.logprobs is not None else None
        extras = Extras(await asyncio.to_thread(_processors_for, body, llm), prompt_logprobs=scored,
                        generate=body.max_tokens != 0)
        return await _serve(request, "text_completion", ids, params, body, logprobs=body.logprobs is not None,
                            echo_prompts=prompts if body.echo else None, extras=extras)

    # ---------------------------------------------------------------- generation
    def _params(body: _Base, max_tokens: int | None, top: int) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        knobs = sampling_knobs(body, state.llm)
        try:
            return SamplingParams(max_new_tokens=max_tokens or state.scheduler.ctx, **knobs, seed=body.seed,
                                  stop=stop, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty, logprobs=top)
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param={"max_new_tokens": "max_tokens"}.get(param, param)) from None

    async def _serve(request: Request, kind: str, prompts: list[list[int]], params: SamplingParams, body: _Base,
                     logprobs: bool, echo_prompts=None, extras: Extras | None = None):
        extras = extras or Extras()
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
                          ignore_eos=body.ignore_eos, processors=extras.new_processors(),
                          prompt_logprobs=extras.prompt_logprobs, generate=extras.generate)
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
            return StreamingResponse(_stream(request, kind, rid, created, jobs, logprobs, include_usage, body.n,
                                             extras, echo_prompts is not None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = await asyncio.gather(*[_collect(q) for *_, q in jobs])
        except asyncio.CancelledError:
            for _, _, job, _ in jobs:
                job.cancelled.set()
            raise
        choices, completion_tokens = [], 0
        for (index, p, job, _), (steps, error) in zip(jobs, results):
            if error is not None:
                raise APIError(500, f"generation failed: {error}", "server_error")
            reason = steps[-1].finish_reason if steps else "length"
            steps = [s for s in steps if s.token_id >= 0]  # a score-only request ends with a Step holding no token
            completion_tokens += len(steps)
            text = "".join(s.text for s in steps)
            if echo_prompts is not None:
                text = state.llm.tokenizer.decode(p) + text
            choice = _choice(kind, index, text, reason, steps if logprobs else None)
            if echo_prompts is not None and logprobs:
                choice["logprobs"] = completion_logprobs(state.llm.tokenizer, steps, p, job.request.prompt_scores)
            choices.append(_with_tool_calls(choice) if extras.tools else choice)
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

    async def _stream(request, kind, rid, created, jobs, logprobs, include_usage, n, extras: Extras, echo: bool):
        obj = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        shapers = [ChoiceStream(index, lambda step, index=index: _chunk(kind, index, step, logprobs),
                                state.llm.tokenizer, tools=extras.tools, logprobs=logprobs,
                                echo=(p, job.request) if echo else None) for index, p, job, _ in jobs]
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
                counts[index] += item.token_id >= 0  # a score-only request's last Step holds no token
                for chunk in shapers[index].chunks(item):
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
        return completion_logprobs(state.llm.tokenizer, steps)

    return app


# ------------------------------------------------------------------------------ issue 14: what real clients send
@dataclass
class Extras:
    """What a request asks beyond plain sampling. ``new_processors()`` gives each sequence its own
    logits processors (a grammar follows one sequence); ``tools``: parse the chat reply into
    ``tool_calls``; ``prompt_logprobs`` / ``generate``: score the prompt (echo), or only that."""

    new_processors: Callable[[], tuple] = tuple
    tools: bool = False
    prompt_logprobs: int | None = None
    generate: bool = True


SAMPLING_KNOBS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(llm) -> dict[str, float]:
    """What a request that leaves a sampling field out gets: the model's own defaults
    (``llm.sampling_defaults``, a mapping or an object with these attributes: its
    ``generation_config.json`` or GGUF ``general.sampling.*``) where it has them, else the
    project's (``SamplingParams``'s, llama.cpp's)."""
    project = SamplingParams()
    model = getattr(llm, "sampling_defaults", None) or {}
    read = model.get if isinstance(model, Mapping) else lambda k: getattr(model, k, None)
    return {k: read(k) if read(k) is not None else getattr(project, k) for k in SAMPLING_KNOBS}


def sampling_knobs(body: _Base, llm) -> dict[str, float]:
    """The request's temperature, top_p, top_k, min_p and repetition_penalty, each it leaves out from
    ``sampling_defaults(llm)``."""
    return {k: v if (v := getattr(body, k)) is not None else default for k, default in sampling_defaults(llm).items()}


def _processors_for(body: _Base, llm) -> Callable[[], tuple]:
    """The logits processors a request asks for, as a factory of one tuple per sequence:
    ``logit_bias`` first, then at most one grammar (``response_format``, ``grammar``, ``regex``, or
    the call a ``tool_choice`` of "required" or a named function demands), so no bias can bring
    back a token the grammar forbids. A bad bias, schema, regex or grammar is a 400 naming the field.
    Compiling a grammar takes ~1 ms (the tokenizer's set-up, once, longer): call it off the event loop."""
    bias = None
    if body.logit_bias:
        try:
            bias = LogitBias(body.logit_bias, llm.tokenizer.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param="logit_bias") from None
    constraint = _constraint_for(body, llm)

    def new() -> tuple:
        return tuple(p for p in (bias, constraint.copy() if constraint else None) if p is not None)
    return new


def _constraint_for(body: _Base, llm) -> GrammarConstraint | None:
    fmt = body.response_format or {}
    if not isinstance(fmt.get("type", "text"), str):
        raise APIError(400, "response_format.type must be a string", param="response_format")
    kind = fmt.get("type", "text")
    asked = [name for name, given in (("response_format", kind != "text"), ("grammar", body.grammar is not None),
                                      ("regex", body.regex is not None),
                                      ("tool_choice", isinstance(body, ChatRequest) and body.tools and
                                       body.tool_choice not in (None, "auto", "none"))) if given]
    if len(asked) > 1:
        raise APIError(400, f"give one of {', '.join(asked)}: each constrains the whole output", param=asked[1])
    tok, param = llm.tokenizer, asked[0] if asked else None
    try:
        if param == "response_format":
            if kind == "json_object":
                return GrammarConstraint.json_object(tok)
            if kind != "json_schema":
                raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                               param="response_format")
            spec = fmt.get("json_schema")
            if not isinstance(spec, Mapping) or "schema" not in spec:
                raise APIError(400, 'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}',
                               param="response_format.json_schema")
            return GrammarConstraint.json_schema(tok, spec["schema"], strict=spec.get("strict") is True)
        if param == "grammar":
            return GrammarConstraint.grammar(tok, body.grammar)
        if param == "regex":
            return GrammarConstraint.regex(tok, body.regex)
        if param == "tool_choice":
            return tool_call_constraint(tok, llm.chat_format, body.tools, body.tool_choice)
    except GrammarError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_" + e.kind) from None
    except ValueError as e:  # a bad tools or tool_choice value
        raise APIError(400, str(e), param=param) from None
    return None


def _tools_prompt(llm, body: ChatRequest) -> list[int] | None:
    """The prompt's ids when the conversation involves tools (``tools`` given, or calls and results in
    its history), rendered by ``render_tools_prompt``; None otherwise (the plain chat prompt)."""
    if body.tools is not None or body.tool_choice is not None:
        try:
            tools = check_tools(body.tools or [])
        except ValueError as e:
            raise APIError(400, str(e), param="tools") from None
        try:
            check_tool_choice(body.tool_choice, tools)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None
    history = any(m.role in ("tool", "ipython") or (m.model_extra or {}).get("tool_calls") for m in body.messages)
    if not body.tools and not history:
        return None
    messages = [{**m.model_dump(), "role": "system" if m.role == "developer" else m.role} for m in body.messages]
    _, ids = render_tools_prompt(llm.chat_format, messages, body.tools or [], body.tool_choice)
    return ids


def _parses_tool_calls(body: ChatRequest) -> bool:
    return bool(body.tools) and body.tool_choice != "none"


def _with_tool_calls(choice: dict) -> dict:
    """A chat choice whose reply holds tool calls, in OpenAI's shape: ``message.tool_calls``, content
    None (or the text around the calls), finish_reason "tool_calls"."""
    content, calls = parse_tool_calls(choice["message"]["content"])
    if not calls:
        return choice
    message = {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]}
    reason = "tool_calls" if choice["finish_reason"] == "stop" else choice["finish_reason"]
    return {**choice, "message": message, "finish_reason": reason}


def completion_logprobs(tokenizer, steps, prompt: list[int] | None = None,
                        scores: list[tuple[float, dict[int, float]]] | None = None, start: int = 0) -> dict:
    """OpenAI's legacy ``logprobs`` block for /v1/completions. With ``prompt`` (echo) its tokens come
    first with their ``scores`` (``Request.prompt_scores``); the first has none (nothing predicts it:
    null, as OpenAI). ``text_offset[i]``: where token i's text begins in the choice's text (plus
    ``start``, the text already streamed); a token whose bytes end inside a character, or whose text
    a stop string cut, begins where the next text does."""
    dec = tokenizer.decode
    tokens, lps, tops, offsets = [], [], [], []
    at = start
    if prompt is not None:
        detok = tokenizer.detokenizer()
        for i, t in enumerate(prompt):
            lp, top = (None, None) if i == 0 else (scores[i - 1][0], {dec([k]): v for k, v in scores[i - 1][1].items()})
            tokens.append(dec([t])), lps.append(lp), tops.append(top), offsets.append(at)
            at += len(detok.add(t))
        at += len(detok.finish())
    for s in steps:  # each Step's text is what its token completed (held-back text comes with a later one)
        tokens.append(dec([s.token_id])), lps.append(s.logprob), offsets.append(at)
        tops.append({dec([t]): v for t, v in s.top_logprobs.items()})
        at += len(s.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


class ChoiceStream:
    """One streamed choice's chunks where the request asks for more than plain text: the echoed
    prompt first (completions, with its logprobs), ``text_offset`` running on across chunks, and
    for tools the reply as tool-call deltas (``ToolCallParser``: the call's id and name, then its
    arguments in pieces) and finish_reason "tool_calls". ``plain(step)`` makes the ordinary chunk."""

    def __init__(self, index: int, plain: Callable, tokenizer, *, tools: bool = False, logprobs: bool = False,
                 echo: tuple | None = None):
        self.index, self.plain, self.tokenizer, self.logprobs = index, plain, tokenizer, logprobs
        self.parser = ToolCallParser() if tools else None
        self.echo = echo  # (prompt ids, engine Request): sent before the first token
        self.offset = 0  # characters of text streamed so far (completions)

    def chunks(self, step) -> list[dict]:
        out = []
        if self.echo is not None:
            prompt, req = self.echo
            self.echo = None
            text = self.tokenizer.decode(prompt)
            lp = completion_logprobs(self.tokenizer, [], prompt, req.prompt_scores) if self.logprobs else None
            out.append({"index": self.index, "text": text, "logprobs": lp, "finish_reason": None})
            self.offset = len(text)
        if step.token_id < 0:  # score only: nothing was generated
            lp = completion_logprobs(self.tokenizer, [], start=self.offset) if self.logprobs else None
            return out + [{"index": self.index, "text": "", "logprobs": lp, "finish_reason": step.finish_reason}]
        chunk = self.plain(step)
        if "text" in chunk and self.logprobs:
            chunk["logprobs"] = completion_logprobs(self.tokenizer, [step], start=self.offset)
            self.offset += len(step.text)
        return out + (self._tool_chunks(chunk, step) if self.parser else [chunk])

    def _tool_chunks(self, chunk: dict, step) -> list[dict]:
        deltas = self.parser.feed(step.text) + (self.parser.finish() if step.finish_reason else [])
        out = [{"index": self.index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if chunk["logprobs"] is not None:  # this token's logprobs ride on its first delta (or an empty one)
            if not out:
                out.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": None})
            out[0]["logprobs"] = chunk["logprobs"]
        if step.finish_reason:
            reason = "tool_calls" if self.parser.calls and step.finish_reason == "stop" else step.finish_reason
            out.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return out


def _encode_vector(v, encoding_format: str):
    """A vector as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


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
                                "/tokenize", "/detokenize", "/v1/embeddings") else "other"
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
