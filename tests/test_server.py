"""The OpenAI-compatible server as a real process on a free local port, driven by the official
`openai` client (sync and async, streaming and not) and by httpx."""

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import llama3

GREEDY = dict(temperature=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "llama3.cli", "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log = []
        threading.Thread(target=lambda: [self.log.append(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.time() + 180
        saw_503 = False
        while time.time() < deadline:
            try:
                r = httpx.get(self.base + "/health", timeout=2)
                if r.status_code == 503:
                    saw_503 = True
                if r.status_code == 200:
                    self.saw_loading = saw_503
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, "".join(self.log)
            time.sleep(0.1)
        raise AssertionError("server did not become healthy:\n" + "".join(self.log))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def metric(self, name: str) -> float:
        text = httpx.get(self.base + "/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1))


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "8", "--ctx", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm():
    return llama3.load(quiet=True)  # the same default path the server runs


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def expected(llm, prompt, n):
    return llm.generate(prompt, max_new_tokens=n, **GREEDY)


def test_health_models_and_loading(server):
    assert server.saw_loading  # /health answered 503 while the model loaded
    r = httpx.get(server.base + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = httpx.get(server.base + "/v1/models").json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"


def test_completion_equals_generate(client, llm):
    prompt = "The capital of France is"
    r = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=20, temperature=0)
    ref = expected(llm, prompt, 20)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == ref.completion_tokens
    assert r.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens


def test_chat_equals_generate_and_stream_concatenates(client, llm):
    messages = [{"role": "user", "content": "Name three colors."}]
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages, max_tokens=40,
                                       temperature=0)
    ref = llm.chat(messages, max_new_tokens=40, **GREEDY)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == ref.completion_tokens
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages, max_tokens=40,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[-1].usage.completion_tokens == ref.completion_tokens and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_async_client_streaming_and_not(server, llm):
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0)
        r = await client.completions.create(model="default", prompt="Once upon a time", max_tokens=12, temperature=0)
        s = await client.completions.create(model="default", prompt="Once upon a time", max_tokens=12, temperature=0,
                                            stream=True)
        parts = [c.choices[0].text async for c in s]
        return r.choices[0].text, "".join(parts)

    text, streamed = asyncio.run(main())
    assert text == streamed == expected(llm, "Once upon a time", 12).text


def test_parameters_logprobs_stop_n_seed(client, llm):
    r = client.completions.create(model="default", prompt="1, 2, 3,", max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(t) == 3 for t in lp.top_logprobs)
    ref = expected(llm, "1, 2, 3,", 10)
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    stop = ref.text[4:7]
    r = client.completions.create(model="default", prompt="1, 2, 3,", max_tokens=10, temperature=0, stop=[stop])
    assert r.choices[0].text == ref.text[:ref.text.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="default", prompt="Tell me a story:", max_tokens=12, temperature=1.0,
                                  seed=7, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 36
    again = client.completions.create(model="default", prompt="Tell me a story:", max_tokens=12, temperature=1.0,
                                      seed=7, n=3)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                          max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    r = client.completions.create(model="default", prompt=["Hello", "The sky is"], max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [expected(llm, p, 5).text for p in ["Hello", "The sky is"]]


def test_unknown_fields_are_ignored(server):
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0,
                                                          "frobnicate": True, "best_of": 1})
    assert r.status_code == 200
    assert any("ignoring unknown fields ['best_of', 'frobnicate']" in line for line in server.log)


def test_tokenize_detokenize(server, llm):
    r = httpx.post(server.base + "/tokenize", json={"content": "Hello world"}).json()
    assert r["tokens"] == llm.tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    d = httpx.post(server.base + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert d["content"] == "Hello world"


def test_32_concurrent_streams(server, llm):
    from openai import AsyncOpenAI

    prompts = [f"Fact number {i}: the" for i in range(32)]
    refs = {p: expected(llm, p, 12).text for p in prompts}

    async def one(client, p):
        s = await client.completions.create(model="default", prompt=p, max_tokens=12, temperature=0, stream=True)
        return p, "".join([c.choices[0].text async for c in s])

    async def main():
        client = AsyncOpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=300)
        return await asyncio.gather(*[one(client, p) for p in prompts])

    results = asyncio.run(main())
    assert len(results) == 32
    for p, text in results:
        assert text == refs[p], p


def test_disconnect_frees_the_sequence(server):
    before = server.metric("llama3_cancelled_total")
    with httpx.stream("POST", server.base + "/v1/completions",
                      json={"prompt": "Write a long essay:", "max_tokens": 400, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert server.metric("llama3_active_sequences") == 1
    deadline = time.time() + 10
    while time.time() < deadline and server.metric("llama3_active_sequences") != 0:
        time.sleep(0.05)
    assert server.metric("llama3_active_sequences") == 0
    assert server.metric("llama3_cancelled_total") == before + 1


def error_of(r, status, type_=None, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if type_:
        assert body["error"]["type"] == type_
    if param:
        assert body["error"]["param"] == param
    return body["error"]


@pytest.mark.parametrize("payload, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": []}, None),
    ({"temperature": 0}, "prompt"),
    ({"prompt": "x", "stop": 5}, None),
])
def test_bad_parameters_are_400(server, payload, param):
    error_of(httpx.post(server.base + "/v1/completions", json=payload), 400, "invalid_request_error", param)


def test_other_errors_and_server_keeps_serving(server, client):
    e = error_of(httpx.post(server.base + "/v1/completions", json={"prompt": "word " * 600}), 400,
                 "invalid_request_error", "prompt")
    assert "tokens, but the context holds 512" in e["message"] and re.search(r"has \d+ tokens", e["message"])
    error_of(httpx.post(server.base + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}),
             400, "invalid_request_error")
    error_of(httpx.post(server.base + "/v1/completions", content=b"{not json",
                        headers={"content-type": "application/json"}), 400, "invalid_request_error")
    error_of(httpx.get(server.base + "/v1/nothing"), 404, "not_found_error")
    error_of(httpx.post(server.base + "/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404,
             "not_found_error", "model")
    error_of(httpx.post(server.base + "/v1/completions", content=b"x" * (5 * 1024 * 1024),
                        headers={"content-type": "application/json"}), 413)
    from openai import BadRequestError

    with pytest.raises(BadRequestError):
        client.completions.create(model="default", prompt="x", temperature=-3)
    # (a prompt whose greedy next token is not a near-tie with end-of-text, so any kernel's rounding agrees)
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=3, temperature=0)
    assert r.choices[0].text and httpx.get(server.base + "/health").status_code == 200


def test_api_key_and_queue_full():
    s = Server("--api-key", "sekret", "--max-batch", "1", "--max-queue", "1", "--ctx", "512")
    try:
        assert httpx.get(s.base + "/health").status_code == 200  # stays open
        error_of(httpx.get(s.base + "/v1/models"), 401, "authentication_error")
        error_of(httpx.get(s.base + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.get(s.base + "/v1/models", headers=auth).status_code == 200

        async def flood():
            """The first request streams (so it holds the only slot), the second waits in the queue of one,
            the third is turned away. No sleeps that a faster decoder could outrun."""
            async with httpx.AsyncClient(timeout=120, headers=auth) as c:
                body = {"prompt": "Count to a hundred:", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
                async with c.stream("POST", s.base + "/v1/completions", json={**body, "stream": True}) as first:
                    lines = first.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: "):
                            break
                    second = asyncio.create_task(c.post(s.base + "/v1/completions", json={**body, "max_tokens": 4}))
                    deadline = time.time() + 30
                    while time.time() < deadline:
                        metrics = (await c.get(s.base + "/metrics")).text
                        if re.search(r"^llama3_queue_depth 1$", metrics, re.M):
                            break
                        await asyncio.sleep(0.01)
                    third = await c.post(s.base + "/v1/completions", json=body)
                    rest = [line async for line in lines]
                return third, first, rest, await second

        third, first, rest, second = asyncio.run(flood())
        assert first.status_code == 200 and "data: [DONE]" in rest
        error_of(third, 429, "rate_limit_error")
        assert third.headers["retry-after"] == "1"
        assert second.status_code == 200
    finally:
        s.stop()


def test_serve_binds_localhost_by_default():
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "serve", "--help"], capture_output=True, text=True)
    assert "default: 127.0.0.1" in out.stdout and "examples:" in out.stdout
