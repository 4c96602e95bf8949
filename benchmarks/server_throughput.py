"""Continuous batching pays: total generated tokens/s with 1 client and with 8 concurrent clients.

    .venv/bin/python benchmarks/server_throughput.py [--clients 8] [--tokens 64] [--requests 16]

Starts `llama3 serve` on a free local port, sends greedy completions with ignore_eos (so every
request generates exactly --tokens tokens), and prints both rates and their ratio.
"""

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(base, clients, requests, tokens):
    async with httpx.AsyncClient(timeout=600) as c:
        queue = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(f"Story number {i}: once upon a time")
        done = 0

        async def worker():
            nonlocal done
            while not queue.empty():
                prompt = queue.get_nowait()
                r = await c.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": tokens,
                                                                 "temperature": 0, "ignore_eos": True})
                done += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        return done / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--model", default=None)
    a = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "llama3.cli", "serve", "--port", str(port), "--max-batch", str(a.clients)]
    if a.model:
        cmd += ["--model", a.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        asyncio.run(run(base, 1, 2, 8))  # warm up
        one = asyncio.run(run(base, 1, max(2, a.requests // a.clients), a.tokens))
        many = asyncio.run(run(base, a.clients, a.requests, a.tokens))
        print(f"machine: {os.cpu_count()} cores; {a.tokens} tokens per request, greedy")
        print(f"| clients | total tokens/s |\n|---|---|\n| 1 | {one:.1f} |\n| {a.clients} | {many:.1f} |")
        print(f"ratio: {many / one:.2f}x")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
