"""The OpenAI-compatible HTTP API on FastAPI: request models at the edge, errors in OpenAI's shape.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming or not), GET /v1/models,
GET /health, GET /metrics, POST /tokenize, POST /detokenize.

The event loop only parses, routes and streams: tokenizing and template rendering run in a small pool of
worker threads (``State.prepare``, each call within ``PREPARE_SECONDS``), generation on the scheduler's
thread. So /health and /metrics answer at once whatever a request asks for, a client that leaves (streaming
or not) frees its slot at the next engine step, and shutdown drains (``State.drain``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import SamplingParams
from .guard import Guard, error_body
from .scheduler import ENDED, Job, Metrics, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("llama3.server")
_UNION_TAG = re.compile(r"\[|^(str|int|float|bool|none|list|dict)$")
DEFAULT_CHAT_MAX_TOKENS = 4096  # a chat request without max_tokens: min(this, what the context has left)
PREPARE_SECONDS = 60.0  # one tokenization or template render, waiting for a worker included
PREPARE_WORKERS = 2


# ------------------------------------------------------------------------------ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


# ------------------------------------------------------------------------------ requests
def _valid_unicode(text: str) -> str:
    """JSON may spell a lone surrogate (\\ud800), which no tokenizer can encode: refuse it here."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text holds a lone surrogate {text[e.start]!r} at character {e.start}, "
                             "which is not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
StopText = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_valid_unicode)]


class TextPart(BaseModel):
    """An OpenAI content part; these models read text only."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: Text


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-2**63, le=2**64 - 1)  # what torch.Generator takes
    stop: StopText | list[StopText] | None = Field(default=None, max_length=16)
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
    content: Text | list[TextPart] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts, joined
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Base):
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]  # ids: not true, not 5.0
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @model_validator(mode="after")
    def _nonempty(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    content: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[StrictInt]


# ------------------------------------------------------------------------------ the app
class State:
    def __init__(self):
        self.llm = None
        self.scheduler: Scheduler | None = None
        self.model_id = ""
        self.error: str | None = None
        self.metrics = Metrics()
        self.draining = False  # shutting down: new requests get 503
        self.guard: Guard | None = None
        self.pool = ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="llama3-prepare")

    async def prepare(self, fn, *args, param: str | None = None):
        """``fn(*args)`` on a worker thread, off the event loop, within ``PREPARE_SECONDS``. A ValueError
        (ChatTemplateError, TokenizerError, a bad id) is the request's fault: a 400 naming ``param``."""
        future = self.pool.submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), PREPARE_SECONDS)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None
        except asyncio.TimeoutError:
            future.cancel()  # if it has not started; a running tokenizer call cannot be interrupted
            raise APIError(503, f"preparing the request took more than {PREPARE_SECONDS:.0f} s; the server is "
                                "overloaded", "service_unavailable", code="prepare_timeout",
                           headers={"Retry-After": "5"}) from None

    async def drain(self, grace: float) -> None:
        """Graceful shutdown: admit nothing more (503), let the requests in flight finish for ``grace``
        seconds, then end the rest with a final event (finish_reason "length") and wait for their answers
        to be sent."""
        self.draining = True
        log.info("shutting down: draining requests in flight for up to %.1f s", grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.scheduler is not None:
            ended = self.scheduler.end_all()
            if ended:
                log.info("shutting down: ended %d sequences still generating", ended)
        deadline = loop.time() + 5.0  # their final chunks and responses, sent
        while self._busy() and loop.time() < deadline:
            await asyncio.sleep(0.02)
            if self.scheduler is not None:
                self.scheduler.end_all()  # one admitted while the first call ran

    def _busy(self) -> bool:
        return bool(self.guard and self.guard.inflight)


def create_app(load_model, *, api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
               ctx: int | None = None, cors_origins: list[str] | None = None, background: bool = True) -> FastAPI:
    """``load_model()`` returns a Llama; it runs in a thread so /health answers 503 meanwhile.
    ``app.state.llama3.drain(grace)`` shuts the server down gracefully (``serve`` calls it on SIGTERM)."""
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
        state.pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- the guard and errors
    def make_guard(inner):
        state.guard = Guard(inner, api_key=api_key, gate=lambda: not state.draining,
                            count=state.metrics.count_request)
        return state.guard

    app.add_middleware(make_guard)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        def path(err) -> list[str]:  # the field's path, without pydantic's names for union members ("str", ...)
            return [str(x) for x in err.get("loc", []) if x != "body" and not _UNION_TAG.search(str(x))]

        # a value no member of a union accepts fails once per member: report the one that got deepest
        err = max(e.errors(), key=lambda err: len(path(err)), default={})
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                                           "invalid_request_error", None, "invalid_json"), status_code=400)
        param = ".".join(path(err)) or None
        message = err.get("msg", "invalid request")
        return JSONResponse(error_body(f"{param + ': ' if param else ''}{message}", "invalid_request_error", param,
                                       "invalid_value"), status_code=400)

    @app.exception_handler(RecursionError)
    async def _nested(request, e: RecursionError):  # json.loads on [[[[...]]]]: the body's fault
        return JSONResponse(error_body("the request body nests too deeply", "invalid_request_error", None,
                                       "invalid_json"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"unknown route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(message, type_, None, None), status_code=e.status_code)

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
    async def health():
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503, headers={"Retry-After": "5"})
        if state.llm is None:
            status = "error" if state.error else "loading"
            return JSONResponse({"status": status, "error": state.error}, status_code=503)
        return {"status": "ok", "model": state.model_id}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        ready()
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                            "owned_by": "llama3"}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        llm = ready()
        if body.messages:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]

            def ids_of():
                return llm.chat_prompt(messages)[1]
            param = "messages"
        else:
            text = body.content if body.content is not None else body.prompt
            if text is None:
                raise APIError(400, "give 'content' (or 'prompt' or 'messages')", param="content")

            def ids_of():
                return llm.encode_prompt(text) if body.add_special else llm.tokenizer.encode(text)
            param = "content"

        def answer() -> bytes:  # a million ids take ~0.3 s to write as JSON: on the worker, in pieces (one
            ids = ids_of()     # json.dumps call holds the GIL throughout, which the event loop needs too)
            pieces = [json.dumps(ids[i:i + 8192])[1:-1] for i in range(0, len(ids), 8192)]
            return (f'{{"tokens": [{", ".join(pieces)}], "count": {len(ids)}, '
                    f'"max_model_len": {state.scheduler.ctx}}}').encode()

        return Response(await state.prepare(answer, param=param), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        llm = ready()
        return {"content": await state.prepare(_decode_ids, llm, body.tokens, param="tokens")}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        llm = ready()
        check_model(body.model)
        _log_unknown(body, "/v1/chat/completions")
        if llm.chat_format is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        _, ids = await state.prepare(llm.chat_prompt, messages, param="messages")
        top = body.top_logprobs if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        params = _params(body, max_tokens, top or 0)
        return await _serve(request, "chat.completion", [ids], params, body, logprobs=body.logprobs)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        llm = ready()
        check_model(body.model)
        _log_unknown(body, "/v1/completions")
        prompts = _prompts(body.prompt)
        ids = await state.prepare(_encode_prompts, llm, prompts, param="prompt")
        params = _params(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs or 0)
        return await _serve(request, "text_completion", ids, params, body, logprobs=body.logprobs is not None,
                            echo_prompts=prompts if body.echo else None)

    # ---------------------------------------------------------------- generation
    def _params(body: _Base, max_tokens: int, top: int) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
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
        if len(prompts) * body.n > sched.max_queue:  # could never be admitted: not a 429 to retry
            raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} asks for {len(prompts) * body.n} sequences, "
                                f"more than this server queues at once (--max-queue {sched.max_queue})",
                           param="n", code="too_many_sequences")
        loop = asyncio.get_running_loop()
        jobs = []
        for i, p in enumerate(prompts):
            for j in range(body.n):
                q: asyncio.Queue = asyncio.Queue()
                seed = params.seed
                if seed is not None and body.n > 1:  # choice j: seed + j, wrapped into torch's 64 bits
                    seed = seed + j if seed + j < 2**64 else seed + j - 2**64
                job_params = SamplingParams(**{**params.__dict__, "seed": seed,
                                               "max_new_tokens": min(params.max_new_tokens, sched.ctx - len(p))})
                job = Job(p, job_params, lambda item, q=q: loop.call_soon_threadsafe(q.put_nowait, item),
                          ignore_eos=body.ignore_eos)
                jobs.append((len(jobs), p, job, q))
        try:
            for _, _, job, _ in jobs:
                sched.submit(job)
        except (QueueFull, ShuttingDown) as e:
            for _, _, job, _ in jobs:
                sched.cancel(job)
            if isinstance(e, ShuttingDown):
                raise APIError(503, "the server is shutting down", "service_unavailable", code="shutting_down",
                               headers={"Retry-After": "5"}) from None
            raise APIError(429, f"the server is busy: {sched.max_queue} requests are already waiting; retry later",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(request, kind, rid, created, jobs, logprobs, include_usage, body.n),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        gathered = asyncio.gather(*[_collect(q) for *_, q in jobs])
        gone = asyncio.create_task(_client_gone(request))
        try:  # a client that leaves cancels its sequences at once, as a stream's does
            await asyncio.wait([gathered, gone], return_when=asyncio.FIRST_COMPLETED)
            if not gathered.done():
                gathered.cancel()
                await asyncio.wait([gathered])
                if not gathered.cancelled():
                    gathered.exception()  # retrieved, so that asyncio does not log it
                return Response(status_code=499)  # nobody reads it; counted as "client closed request"
            results = gathered.result()
        finally:
            gone.cancel()
            for _, _, job, _ in jobs:
                sched.cancel(job)  # a no-op for finished jobs
        failed = next((end for _, end in results if isinstance(end, Exception)), None)
        if failed is not None:  # the engine failed (the scheduler logged why); not the client's doing
            log.error("generation failed for %s (request id %s): %s", rid, _request_id(request), failed)
            raise APIError(500, f"generation failed (request id {_request_id(request)}): {failed}", "server_error")

        def answer() -> dict:  # echoed prompts and logprobs decode up to 21 tokens a step: on a worker
            choices = []
            for (index, p, _, _), (steps, end) in zip(jobs, results):
                text = "".join(s.text for s in steps)
                if echo_prompts is not None:
                    text = state.llm.tokenizer.decode(p) + text
                reason = steps[-1].finish_reason if steps and end is None else "length"
                choices.append(_choice(kind, index, text, reason, steps if logprobs else None))
            completion_tokens = sum(len(steps) for steps, _ in results)
            return {"id": rid, "object": kind, "created": created, "model": state.model_id, "choices": choices,
                    "usage": _usage(prompts, jobs, completion_tokens, body.n)}

        return await state.prepare(answer)

    async def _collect(q: asyncio.Queue):
        """(steps, end): end is None when the sequence finished, ENDED when the server ended it early
        (shutdown), or the engine's exception."""
        steps = []
        while True:
            item = await q.get()
            if item is None or item is ENDED or isinstance(item, Exception):
                return steps, item
            steps.append(item)

    async def _stream(request, kind, rid, created, jobs, logprobs, include_usage, n):
        obj = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index, q):
            while True:
                item = await q.get()
                await merged.put((index, item))
                if item is None or item is ENDED or isinstance(item, Exception):
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
                if item is None or item is ENDED or isinstance(item, Exception):
                    open_jobs -= 1
                    if item is ENDED:  # shutdown: a proper last chunk for this choice
                        yield _sse({"id": rid, "object": obj, "created": created, "model": state.model_id,
                                    "choices": [_chunk(kind, index, None, False, "length")]})
                    elif isinstance(item, Exception):
                        log.error("generation failed for %s (request id %s): %s", rid, _request_id(request), item)
                        yield _sse(error_body(f"generation failed (request id {_request_id(request)}): {item}",
                                              "server_error"))
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
                state.scheduler.cancel(job)
            for t in tasks:
                t.cancel()

    def _choice(kind, index, text, reason, steps):
        lp = _logprobs(kind, steps) if steps is not None else None
        if kind == "chat.completion":
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                    "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

    def _chunk(kind, index, step, logprobs, reason=None):
        """One choice of a stream chunk: a Step, or (step None) an empty last one with ``reason``."""
        text, reason = (step.text, step.finish_reason) if step is not None else ("", reason)
        lp = _logprobs(kind, [step]) if logprobs and step is not None and step.text is not None else None
        if kind == "chat.completion":
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": lp,
                    "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

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


def _request_id(request: Request) -> str | None:
    """The id the guard gave this request (logged with any failure; also in the x-request-id header)."""
    return request.scope.get("state", {}).get("request_id")


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (its body was read, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _encode_prompts(llm, prompts: list) -> list[list[int]]:
    """Token ids for each prompt (text or ids); ids must lie in the vocabulary (ValueError otherwise)."""
    vocab = min(llm.tokenizer.vocab_size, llm.model.args.vocab_size)
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(llm.encode_prompt(p))
            continue
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        out.append(list(p))
    return out


def _decode_ids(llm, ids: list[int]) -> str:
    bad = next((t for t in ids if not 0 <= t < llm.tokenizer.vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {llm.tokenizer.vocab_size})")
    return llm.tokenizer.decode(ids)


def _log_unknown(body: BaseModel, endpoint: str) -> None:
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        log.info("%s: ignoring unknown fields %s", endpoint, extra)


def _model_id(llm) -> str:
    from pathlib import Path

    p = Path(llm.path)
    return p.stem if p.suffix == ".gguf" else p.name
