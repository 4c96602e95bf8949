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

The event loop only parses, routes and streams: tokenizing and template rendering run in a small pool of
worker threads (``State.prepare``, each call within ``PREPARE_SECONDS``), generation on the scheduler's
thread. So /health and /metrics answer at once whatever a request asks for, a client that leaves (streaming
or not) frees its slot at the next engine step, and shutdown drains (``State.drain``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..embeddings import embed
from ..processors import LogitBias
from ..sampling import SamplingParams
from ..structured import GrammarConstraint, GrammarError
from ..tools import (ToolCallParser, check_tool_choice, check_tools, parse_tool_calls, render_tools_prompt,
                     tool_call_constraint)
from .guard import Guard, error_body
from .scheduler import ENDED, Job, Metrics, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("llama3.server")
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
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
    # left out (None): sampling_defaults(llm)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-2**63, le=2**64 - 1)  # what torch.Generator takes
    stop: StopText | list[StopText] | None = Field(default=None, max_length=16)
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
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None  # accepted; Llama 3's format writes one call per reply


class CompletionRequest(_Base):
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]  # ids: not true, not 5.0
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
    content: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special: bool = False
    add_special_tokens: bool | None = None  # vLLM's name for add_special (lm-evaluation-harness sends it)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[StrictInt]


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
            special = body.add_special if body.add_special_tokens is None else body.add_special_tokens

            def ids_of():
                return llm.encode_prompt(text) if special else llm.tokenizer.encode(text)
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
        text = await state.prepare(_decode_ids, llm, body.tokens, param="tokens")
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
        def prompt_ids() -> list[int]:  # tools change the prompt (and a bad tool is a 400 naming it)
            ids = _tools_prompt(llm, body)
            return ids if ids is not None else llm.chat_prompt(messages)[1]

        ids = await state.prepare(prompt_ids, param="messages")
        top = body.top_logprobs if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        params = _params(body, max_tokens, top or 0)
        extras = Extras(await state.prepare(_processors_for, body, llm), tools=_parses_tool_calls(body))
        return await _serve(request, "chat.completion", [ids], params, body, logprobs=body.logprobs, extras=extras)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        llm = ready()
        check_model(body.model)
        _log_unknown(body, "/v1/completions")
        prompts = _prompts(body.prompt)
        ids = await state.prepare(_encode_prompts, llm, prompts, param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens")
        params = _params(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs or 0)
        scored = body.logprobs if body.echo and body.logprobs is not None else None
        extras = Extras(await state.prepare(_processors_for, body, llm), prompt_logprobs=scored,
                        generate=body.max_tokens != 0)
        return await _serve(request, "text_completion", ids, params, body, logprobs=body.logprobs is not None,
                            echo_prompts=prompts if body.echo else None, extras=extras)

    # ---------------------------------------------------------------- generation
    def _params(body: _Base, max_tokens: int, top: int) -> SamplingParams:
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
                          ignore_eos=body.ignore_eos, processors=extras.new_processors(),
                          prompt_logprobs=extras.prompt_logprobs, generate=extras.generate)
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
            return StreamingResponse(_stream(request, kind, rid, created, jobs, logprobs, include_usage, body.n,
                                             extras, echo_prompts is not None),
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
            choices, completion_tokens = [], 0
            for (index, p, job, _), (steps, end) in zip(jobs, results):
                reason = steps[-1].finish_reason if steps and end is None else "length"
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
