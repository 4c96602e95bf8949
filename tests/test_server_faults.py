"""The server under abuse (issues 15 and 18), each test against a real `llama3 serve` process on a free
loopback port, bounded in count and time: client mistakes (always a typed 4xx, never a 5xx), slow clients,
chunked bodies past the limit, disconnects at random moments (streaming or not), bursts past --max-queue,
CPU-heavy requests next to /health, graceful shutdown on SIGTERM/SIGINT, memory over 1,000 requests, and
greedy outputs unchanged by all of it. ``TALLY`` counts every answer; the last test prints it."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_server import Server, error_of

TALLY: Counter = Counter()  # answers by class over this module: "2xx", "4xx", "5xx", "dropped"
GREEDY_PROMPTS = ["The capital of France is", "1, 2, 3,", "Once upon a time"]
HEALTH_BOUND = 0.1  # seconds: /health and /metrics answer within this while a heavy request is prepared


def tally(status: int) -> int:
    TALLY["503" if status == 503 else f"{status // 100}xx"] += 1  # 503: shutting down (or loading)
    return status


def greedy(base: str) -> list[str]:
    out = []
    for p in GREEDY_PROMPTS:
        r = httpx.post(base + "/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0}, timeout=60)
        assert tally(r.status_code) == 200, r.text
        out.append(r.json()["choices"][0]["text"])
    r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 12, "temperature": 0})
    assert tally(r.status_code) == 200, r.text
    return out + [r.json()["choices"][0]["message"]["content"]]


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "8", "--max-queue", "64", "--ctx", "512")
    s.before = greedy(s.base)  # compared with the same requests after the abuse (the last test)
    yield s
    s.stop()


def metric(base: str, name: str, headers: dict | None = None) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(base + "/metrics", headers=headers).text, re.MULTILINE)
    return float(m.group(1))


def wait_idle(base: str, seconds: float = 15, headers: dict | None = None) -> None:
    """Every sequence gone and every KV block free (blocks kept for prefix reuse are not in use)."""
    deadline = time.time() + seconds
    names = ("llama3_active_sequences", "llama3_queue_depth", "llama3_kv_cache_blocks_in_use")
    while time.time() < deadline:
        if all(metric(base, n, headers) == 0 for n in names):
            return
        time.sleep(0.05)
    raise AssertionError({n: metric(base, n, headers) for n in names})


def watch_latency(base: str, busy: threading.Event) -> list[float]:
    """Latencies of /health and /metrics, alternately, while ``busy`` is set."""
    out = []
    with httpx.Client(timeout=10) as c:
        while busy.is_set():
            for path in ("/health", "/metrics"):
                start = time.perf_counter()
                assert c.get(base + path).status_code == 200
                out.append(time.perf_counter() - start)
            time.sleep(0.01)
    return out


def while_busy(base: str, work) -> tuple[object, list[float]]:
    """Run ``work()`` in a thread and measure /health and /metrics meanwhile."""
    busy = threading.Event()
    busy.set()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: (work(), busy.clear())[0])
        latencies = watch_latency(base, busy)
        return future.result(), latencies


# ------------------------------------------------------------------------------ client mistakes
VOCAB = 49152  # SmolLM2's
SURROGATE = '"a\\ud800b"'  # JSON's spelling of a lone surrogate: not valid Unicode
BAD_REQUESTS = [
    ("/v1/completions", '{"prompt": "x", "seed": 18446744073709551616}', "seed"),  # 2^64
    ("/v1/completions", '{"prompt": "x", "seed": -9223372036854775809}', "seed"),  # -2^63 - 1
    ("/v1/completions", '{"prompt": [[1, 2, 3], [4]], "seed": 18764444073709551615}', "seed"),  # the fuzz input
    ("/v1/completions", '{"prompt": [1, -1]}', "prompt"),
    ("/v1/completions", f'{{"prompt": [1, {VOCAB}]}}', "prompt"),
    ("/v1/completions", '{"prompt": [9223372036854775808]}', "prompt"),  # 2^63
    ("/v1/completions", '{"prompt": [[5], [1, 99999999999999999999999]]}', "prompt"),
    ("/v1/completions", f'{{"prompt": {SURROGATE}}}', "prompt"),
    ("/v1/completions", f'{{"prompt": ["ok", {SURROGATE}]}}', "prompt"),
    ("/v1/completions", f'{{"prompt": "x", "stop": [{SURROGATE}]}}', "stop"),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": list("abcdefghijklmnopq")}), "stop"),  # 17 stops
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}',
     "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}), "messages"),
    ("/v1/chat/completions",
     f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": {SURROGATE}}}]}}]}}',
     "messages"),
    ("/tokenize", f'{{"content": {SURROGATE}}}', "content"),
    ("/tokenize", f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}', "messages"),
    ("/detokenize", '{"tokens": [9223372036854775808]}', "tokens"),
    ("/detokenize", '{"tokens": [true, 5]}', "tokens"),
    ("/v1/completions", '{"prompt": [1, 5.0]}', "prompt"),
    ("/v1/completions", "[" * 100_000 + "]" * 100_000, None),  # json.loads: RecursionError
]


@pytest.mark.parametrize("path, body, param", BAD_REQUESTS, ids=[f"{p}:{b[:48]}" for p, b, _ in BAD_REQUESTS])
def test_client_mistakes_are_400_naming_the_field(server, path, body, param):
    r = httpx.post(server.base + path, content=body.encode(), headers={"content-type": "application/json"})
    tally(r.status_code)
    e = error_of(r, 400, "invalid_request_error")
    if param:
        assert e["param"] == param or e["param"].startswith(param + "."), e
    assert re.fullmatch(r"req-[0-9a-f]{24}", r.headers["x-request-id"])


def test_edge_values_that_are_fine(server):
    """The bounds are not tighter than they should be: the extreme seeds (with n > 1, whose seeds are
    seed + i wrapped into 64 bits), the last token id, text parts joined."""
    for seed in (2**64 - 1, -(2**63)):
        r = httpx.post(server.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "seed": seed, "n": 2})
        assert tally(r.status_code) == 200, r.text
    r = httpx.post(server.base + "/v1/completions", json={"prompt": [1, VOCAB - 1], "max_tokens": 2})
    assert tally(r.status_code) == 200, r.text
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name three "},
                                                       {"type": "text", "text": "colors."}]}],
             "max_tokens": 12, "temperature": 0}
    r = httpx.post(server.base + "/v1/chat/completions", json=parts)
    assert tally(r.status_code) == 200 and r.json()["choices"][0]["message"]["content"] == server.before[-1]
    r = httpx.post(server.base + "/health", headers={"x-request-id": "my-trace-42"})
    assert r.headers["x-request-id"] == "my-trace-42"  # a client's id is kept (a sane one)


def test_chat_max_tokens_default_is_bounded_by_the_context(server):
    """Without max_tokens a chat reply stops at the context's end (512 here; the default cap is 4096)."""
    r = httpx.post(server.base + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Count from one to a thousand."}], "ignore_eos": True})
    assert tally(r.status_code) == 200
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512
    assert r.json()["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------------------ the event loop stays free
def post_elsewhere(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    """POST from another process (encoding 4 MB, or decoding a million ids, in this one would hold its GIL,
    and the latencies measured here would be this process's, not the server's); the answer without "tokens"."""
    code = ("import httpx, json, sys; r = httpx.post(sys.argv[1], content=sys.stdin.buffer.read(), timeout=120, "
            "headers={'content-type': 'application/json'}); a = r.json(); a.pop('tokens', None); "
            "print(json.dumps([r.status_code, a]))")
    done = subprocess.run([sys.executable, "-c", code, url], input=json.dumps(body).encode(), capture_output=True,
                          timeout=timeout, check=True)
    status, answer = json.loads(done.stdout)
    return tally(status), answer


def check_latencies(what: str, latencies: list[float], took: float) -> None:
    """The loop never waits on the work: 90% of answers within HEALTH_BOUND and every one within 1 s (on
    this shared 2-core machine the slowest includes the OS's scheduling; before, /health waited for the
    whole tokenization: over 60 s)."""
    latencies = sorted(latencies)
    p90 = latencies[int(0.9 * len(latencies))]
    print(f"{what}: {len(latencies)} answers in {took:.1f} s, 90% within {p90 * 1000:.0f} ms, "
          f"slowest {latencies[-1] * 1000:.0f} ms")
    assert len(latencies) >= 10, (took, latencies)
    assert p90 < HEALTH_BOUND and latencies[-1] < 1.0, (p90, latencies[-1])


def test_health_answers_while_a_4mb_prompt_is_tokenized(server):
    text = "The quick brown fox jumps over the lazy dog. " * (4_000_000 // 45)  # ~4 MB, ~900k tokens
    for path, body in (("/v1/completions", {"prompt": text}), ("/tokenize", {"content": text})):
        start = time.perf_counter()
        (status, answer), latencies = while_busy(server.base, lambda p=path, b=body: post_elsewhere(server.base + p, b))
        took = time.perf_counter() - start
        if path == "/tokenize":
            assert status == 200 and answer["count"] > 800_000
        else:  # tokenized, then refused for the context
            assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
        check_latencies(path, latencies, took)


@pytest.fixture(scope="module")
def slow_template_gguf(tmp_path_factory):
    """SmolLM2's GGUF whose chat template spins ~1 s (2 million loop steps, within the 2 s render budget)
    before writing the same ChatML: patched in place, at the same length, in a copy."""
    from helpers import smollm2_path

    data = bytearray(Path(smollm2_path()).read_bytes())
    old = b"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    at = data.index(old)
    length = int.from_bytes(data[at - 8:at], "little")
    new = (b"{% for i in range(2000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"
           b"{% for m in messages %}{{'<|im_start|>'+m['role']+'\\n'+m['content']+'<|im_end|>\\n'}}{% endfor %}"
           b"{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")
    new += b"{#" + b" " * (length - len(new) - 4) + b"#}"
    assert len(new) == length
    data[at:at + length] = new
    path = tmp_path_factory.mktemp("slow") / "slow-template.gguf"
    path.write_bytes(bytes(data))
    return path


def test_health_answers_while_a_slow_template_renders(slow_template_gguf):
    s = Server("--model", str(slow_template_gguf), "--ctx", "512")
    try:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}

        def chats():  # two at once: both workers busy rendering
            with ThreadPoolExecutor(2) as pool:
                return list(pool.map(lambda _: httpx.post(s.base + "/v1/chat/completions", json=body, timeout=60),
                                     range(2)))

        start = time.perf_counter()
        rs, latencies = while_busy(s.base, chats)
        took = time.perf_counter() - start
        assert [tally(r.status_code) for r in rs] == [200, 200], [r.text for r in rs]
        assert took > 0.8, took  # the template did spin
        check_latencies("slow template", latencies, took)
    finally:
        s.stop()


# ------------------------------------------------------------------------------ disconnects
def test_non_streaming_disconnect_frees_the_slot_at_once(server):
    """A client that leaves a non-streaming request cancels it: its slot and KV blocks are free within
    one engine step (a few tokens, not the 400 it asked for)."""
    wait_idle(server.base)
    cancelled = metric(server.base, "llama3_cancelled_total")
    body = json.dumps({"prompt": "Write a long essay:", "max_tokens": 400, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 20
    while metric(server.base, "llama3_active_sequences") != 1 or metric(server.base, "llama3_completion_tokens_total") \
            == 0:
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(0.2)  # well into decoding
    tokens = metric(server.base, "llama3_completion_tokens_total")
    sock.close()
    left = time.perf_counter()
    while metric(server.base, "llama3_kv_cache_blocks_in_use") != 0:
        assert time.perf_counter() - left < 5
        time.sleep(0.005)
    freed_in = time.perf_counter() - left
    after = metric(server.base, "llama3_completion_tokens_total") - tokens
    TALLY["dropped"] += 1
    assert metric(server.base, "llama3_active_sequences") == 0
    assert metric(server.base, "llama3_cancelled_total") == cancelled + 1
    assert after <= 4 and freed_in < 0.5, (after, freed_in)  # the steps already under way, then freed


def test_64_streams_disconnecting_at_random_moments(server):
    rng = random.Random(15)
    plan = [(rng.choice(["/v1/completions", "/v1/chat/completions"]), rng.randint(0, 40)) for _ in range(64)]

    async def one(client, path, lines):
        body = {"max_tokens": 200, "ignore_eos": True, "stream": True}
        body |= {"prompt": "Tell a long story:"} if path == "/v1/completions" else \
            {"messages": [{"role": "user", "content": "Tell a long story."}]}
        async with client.stream("POST", server.base + path, json=body) as r:
            tally(r.status_code)
            assert r.status_code == 200
            read = 0
            async for _ in r.aiter_lines():
                read += 1
                if read >= lines:
                    break
        TALLY["dropped"] += 1

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            await asyncio.gather(*[one(client, path, lines) for path, lines in plan])

    asyncio.run(main())
    wait_idle(server.base)
    assert httpx.get(server.base + "/health").status_code == 200


# ------------------------------------------------------------------------------ slow and oversized clients
def test_slowloris_clients_do_not_block_others(server):
    """64 connections trickle headers (or a body) a byte at a time; meanwhile others are served."""
    socks = []
    for i in range(64):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                  b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        socks.append(s)
    try:
        start = time.time()
        for round_ in range(10):
            for s in socks:
                s.sendall(b"X" if socks.index(s) % 2 else b" ")
            r = httpx.post(server.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
            assert tally(r.status_code) == 200
            start_h = time.perf_counter()
            assert httpx.get(server.base + "/health", timeout=10).status_code == 200
            assert time.perf_counter() - start_h < 1
        assert time.time() - start < 30
    finally:
        for s in socks:
            s.close()
            TALLY["dropped"] += 1


def test_chunked_bodies_are_capped(server):
    def chunks(total, piece=64 * 1024):
        yield b'{"prompt": "'
        sent = 0
        while sent < total:
            yield b"a" * piece
            sent += piece
        yield b'", "max_tokens": 2}'

    r = httpx.post(server.base + "/v1/completions", content=chunks(5 * 1024 * 1024),
                   headers={"content-type": "application/json"}, timeout=60)
    tally(r.status_code)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert error_of(r, 413)["code"] == "body_too_large"
    r = httpx.post(server.base + "/v1/completions", content=chunks(64 * 1024, 1024),
                   headers={"content-type": "application/json"}, timeout=60)
    assert tally(r.status_code) == 400 and error_of(r, 400)["code"] == "context_length_exceeded"  # read whole
    small = (b for b in [b'{"prompt": "The capital', b' of France is", "max_tokens": 12, "temperature": 0}'])
    r = httpx.post(server.base + "/v1/completions", content=small, headers={"content-type": "application/json"})
    assert tally(r.status_code) == 200 and r.json()["choices"][0]["text"] == server.before[0]


# ------------------------------------------------------------------------------ bursts, limits, auth
def test_bursts_past_the_queue_auth_and_n_limit():
    s = Server("--api-key", "sekret", "--max-batch", "2", "--max-queue", "4", "--ctx", "256")
    try:
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = httpx.get(s.base + "/v1/models", headers={"Authorization": f"{scheme} sekret"})
            assert tally(r.status_code) == 200, scheme
        for auth in ("Bearer sekre", "Basic sekret", "Bearersekret", ""):
            error_of(httpx.get(s.base + "/v1/models", headers={"Authorization": auth}), 401, "authentication_error")
            tally(401)
        auth = {"Authorization": "Bearer sekret"}
        e = error_of(httpx.post(s.base + "/v1/completions", headers=auth, json={"prompt": "x", "n": 5}), 400,
                     param="n")
        tally(400)
        assert "--max-queue 4" in e["message"] and "5" in e["message"]
        r = httpx.post(s.base + "/v1/completions", headers=auth, json={"prompt": ["a", "b"], "n": 2, "max_tokens": 2})
        assert tally(r.status_code) == 200 and len(r.json()["choices"]) == 4

        async def burst():
            async with httpx.AsyncClient(timeout=120, headers=auth, limits=httpx.Limits(max_connections=64)) as c:
                return await asyncio.gather(*[c.post(s.base + "/v1/completions", json={
                    "prompt": f"Burst {i}:", "max_tokens": 8, "stream": i % 2 == 0}) for i in range(48)])

        codes = Counter(tally(r.status_code) for r in asyncio.run(burst()))
        assert set(codes) == {200, 429} and codes[429] >= 24, codes  # 2 running + 4 waiting at most
        wait_idle(s.base, headers=auth)
    finally:
        s.stop()


# ------------------------------------------------------------------------------ graceful shutdown
def _shutdown_run(sig: int, grace: str, expect_within: float):
    """8 long streams, one long non-streaming request and one short stream in flight; then ``sig``."""
    s = Server("--max-batch", "10", "--ctx", "512", "--shutdown-grace", grace)
    try:
        long_body = {"prompt": "Count to a thousand:", "max_tokens": 500, "ignore_eos": True}
        results, started = {}, threading.Barrier(11)

        def stream(i, max_tokens):
            lines = []
            with httpx.stream("POST", s.base + "/v1/completions", timeout=60,
                              json={**long_body, "max_tokens": max_tokens, "stream": True,
                                    "stream_options": {"include_usage": True}}) as r:
                tally(r.status_code)
                for line in r.iter_lines():
                    if line.startswith("data: ") and len(lines) == 0:
                        started.wait()
                    lines.append(line)
            results[i] = [line[6:] for line in lines if line.startswith("data: ")]

        def plain():
            started.wait()
            r = httpx.post(s.base + "/v1/completions", json=long_body, timeout=60)
            tally(r.status_code)
            results["plain"] = r

        threads = [threading.Thread(target=stream, args=(i, 500)) for i in range(8)]
        threads += [threading.Thread(target=stream, args=("short", 8)), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        time.sleep(0.3)  # the non-streaming one admitted too
        signalled = time.time()
        s.proc.send_signal(sig)
        time.sleep(0.1)
        refused = httpx.post(s.base + "/v1/completions", json={"prompt": "late", "max_tokens": 2})
        tally(refused.status_code)
        assert error_of(refused, 503)["code"] == "shutting_down" and refused.headers["retry-after"]
        health = httpx.get(s.base + "/health")
        assert health.status_code == 503 and health.json()["status"] == "shutting_down"
        for t in threads:
            t.join(timeout=60)
        assert s.proc.wait(timeout=30) == 0, "".join(s.log)
        took = time.time() - signalled
        assert "Traceback" not in "".join(s.log), "".join(s.log)
        print(f"{signal.Signals(sig).name}: 10 requests in flight, exit 0 after {took:.1f} s")
        assert took < expect_within, took
        for i in range(8):  # each long stream: tokens, an empty last chunk with finish_reason "length", usage, [DONE]
            events = results[i]
            assert events[-1] == "[DONE]", events[-3:]
            last = json.loads(events[-3])["choices"][0]
            assert last["finish_reason"] == "length" and last["text"] == "", last
            assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-3])
            assert 0 < json.loads(events[-2])["usage"]["completion_tokens"] < 500
        short = results["short"]  # finished by itself within the grace
        assert short[-1] == "[DONE]" and json.loads(short[-2])["usage"]["completion_tokens"] == 8
        plain = results["plain"]
        assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] == "length"
        assert 0 < plain.json()["usage"]["completion_tokens"] < 500
        return took
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_sigterm_drains_eight_streams_and_exits_0():
    took = _shutdown_run(signal.SIGTERM, "3", 15)
    assert took > 3  # the grace was given


def test_sigint_is_the_same_drain_faster():
    assert _shutdown_run(signal.SIGINT, "30", 8) < 8  # at most 1 s of grace instead of 30


# ------------------------------------------------------------------------------ memory, and the outputs after
OTHER_GROWTH_MB = 32  # what 1,000 requests may add to the server's memory beside the KV cache's pages


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def test_rss_after_1000_small_requests(server):
    """1,000 small requests of every kind (1 in 10 generates a token, a completion or a chat reply). The
    KV cache's pages become resident as its blocks are first used (bounded by the cache's size, reported
    by /metrics); everything else together may grow by OTHER_GROWTH_MB."""
    def requests(count):
        async def one(c, i):
            kind, url = i % 10, server.base
            if i % 20 == 0:
                r = await c.post(url + "/v1/completions", json={"prompt": f"Item {i}:", "max_tokens": 1})
            elif i % 20 == 1:
                r = await c.post(url + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 1})
            elif kind < 6:  # kinds 2-5, and 0-1 when not generating
                r = await c.post(url + "/tokenize", json={"content": f"token {i} " * 20, "add_special": i % 2 == 0})
            elif kind < 8:
                r = await c.post(url + "/detokenize", json={"tokens": list(range(i, i + 20))})
            elif kind == 8:  # client mistakes
                r = await c.post(url + "/v1/completions", json={"prompt": [i, -i - 1]})
            else:
                r = await c.post(url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", '
                                 b'"content": "\\udfff"}]}', headers={"content-type": "application/json"})
            return tally(r.status_code)

        async def main():  # 32 clients at a time
            slots = asyncio.Semaphore(32)

            async def limited(c, i):
                async with slots:
                    return await one(c, i)

            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as c:
                return await asyncio.gather(*[limited(c, i) for i in range(count)])

        return Counter(asyncio.run(main()))

    requests(100)  # warm up: allocator pools, the tokenizer's caches
    wait_idle(server.base)
    before, kv_before = rss_mb(server.proc.pid), metric(server.base, "llama3_kv_cache_resident_bytes") / 2**20
    start = time.perf_counter()
    codes = requests(1000)
    took = time.perf_counter() - start
    wait_idle(server.base)
    grown = rss_mb(server.proc.pid) - before
    kv_grown = metric(server.base, "llama3_kv_cache_resident_bytes") / 2**20 - kv_before
    print(f"RSS {before:.0f} MB -> {before + grown:.0f} MB over 1,000 requests in {took:.1f} s ({dict(codes)}), "
          f"of which the KV cache's blocks {kv_grown:+.0f} MB")
    assert codes == Counter({200: 800, 400: 200})
    assert grown - max(kv_grown, 0) < OTHER_GROWTH_MB, (grown, kv_grown)


def test_greedy_outputs_unchanged_after_the_abuse_and_no_5xx(server):
    assert greedy(server.base) == server.before
    assert httpx.get(server.base + "/health").status_code == 200
    served = Counter()  # what the server itself counted, by class (/health's 503s: while it loaded)
    for endpoint, status, n in re.findall(r'^llama3_requests_total\{endpoint="([^"]+)",status="(\d+)"\} (\d+)$',
                                          httpx.get(server.base + "/metrics").text, re.MULTILINE):
        served["503 /health" if (endpoint, status) == ("/health", "503") else f"{status[0]}xx"] += int(n)
    print(f"fault suite: {sum(v for k, v in TALLY.items() if k != 'dropped')} answers, {TALLY['dropped']} clients "
          f"that left on purpose: {dict(TALLY)}; the main server counted {dict(served)}")
    assert TALLY["5xx"] == 0 and served["5xx"] == 0
    log = "".join(server.log)
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 2000):log.find("Traceback") + 3000]


# ------------------------------------------------------------------------------ a bug, should one happen
def test_a_bug_is_a_logged_500_with_the_request_id_and_the_server_keeps_serving(caplog):
    """The guard in front of any ASGI app (no client input reaches a 5xx in the real server, so a bug is
    planted in a stand-in): the answer is OpenAI's error shape naming the request id, the log has the
    traceback with the same id, and the next request is served."""
    from llama3.server.guard import Guard

    async def app(scope, receive, send):
        if scope["path"] == "/bug":
            raise ZeroDivisionError("planted")
        if scope["path"] == "/stream-bug":  # after the response began: the connection ends, logged too
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            raise ZeroDivisionError("planted mid-stream")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    counted = []
    guard = Guard(app, api_key=None, gate=lambda: True, count=lambda e, s: counted.append(s))

    async def main():
        transport = httpx.ASGITransport(app=guard, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            bug = await c.get("/bug")
            sent = []  # mid-stream, by hand (httpx's transport insists on complete responses)

            async def receive():
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message):
                sent.append(message)

            await guard({"type": "http", "method": "GET", "path": "/stream-bug", "headers": []}, receive, send)
            assert [m.get("status", m.get("body")) for m in sent] == [200, b"data: 1\n\n"]  # then the end
            return bug, await c.get("/fine")

    with caplog.at_level("ERROR", logger="llama3.server"):
        bug, fine = asyncio.run(main())
    rid = bug.headers["x-request-id"]
    e = error_of(bug, 500, "server_error")
    assert rid in e["message"] and "planted" not in e["message"]  # the id, not the internals
    assert any(rid in r.getMessage() and r.exc_info for r in caplog.records)
    assert sum("ZeroDivisionError: planted mid-stream" in r.exc_text for r in caplog.records if r.exc_text) == 1
    assert fine.status_code == 200 and fine.text == "ok" and counted == [500, 500, 200]
