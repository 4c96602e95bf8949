"""The server's memory follows the tokens in flight: resident memory of `llama3 serve` at idle, then with
--streams concurrent streams of --tokens tokens each, against what a cache allocated up front for every
slot at full context would take.

    .venv/bin/python benchmarks/serve_memory.py [--model M] [--streams 64] [--tokens 512]

Starts the server on a free local port with --max-batch = --streams, reads its VmRSS/VmHWM from /proc,
and reads the KV cache's own numbers from /metrics.
"""

import argparse
import asyncio
import os
import platform
import re
import socket
import subprocess
import sys
import time

import httpx


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) / 1024
    return out


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def streams(base: str, n: int, tokens: int, pid: int) -> tuple[float, float, float]:
    """(total generated tokens per second, highest RSS sampled during the run, highest KV bytes)."""
    peak_rss, peak_kv, done = 0.0, 0.0, 0
    async with httpx.AsyncClient(timeout=3600) as c:
        async def one(i):
            nonlocal done
            body = {"prompt": f"Story number {i}: once upon a time", "max_tokens": tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            async with c.stream("POST", base + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        done += 1

        async def sample():
            nonlocal peak_rss, peak_kv
            while True:
                peak_rss = max(peak_rss, memory_mb(pid)["VmRSS"])
                peak_kv = max(peak_kv, metric(base, "llama3_kv_cache_resident_bytes"))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        start = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(n)])
        elapsed = time.perf_counter() - start
        sampler.cancel()
    return done / elapsed, peak_rss, peak_kv


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=512)
    a = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "llama3.cli", "serve", "--port", str(port), "--max-batch", str(a.streams),
           "--max-queue", str(max(64, a.streams))]
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
        time.sleep(2)
        idle = memory_mb(proc.pid)
        rate, peak_rss, peak_kv = asyncio.run(streams(base, a.streams, a.tokens, proc.pid))
        after = memory_mb(proc.pid)
        time.sleep(1)
        health = httpx.get(base + "/health").json()
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor())
        print(f"machine: {cpu}, {os.cpu_count()} cores; model: {health.get('model')}")
        print(f"idle: RSS {idle['VmRSS']:.0f} MB (peak so far {idle['VmHWM']:.0f} MB)")
        print(f"{a.streams} streams x {a.tokens} tokens: {rate:.1f} tokens/s in total; RSS peak {peak_rss:.0f} MB "
              f"(VmHWM {after['VmHWM']:.0f} MB); KV cache at most {peak_kv / 2**20:.0f} MB resident")
        print(f"after the streams: RSS {memory_mb(proc.pid)['VmRSS']:.0f} MB, KV cache "
              f"{metric(base, 'llama3_kv_cache_resident_bytes') / 2**20:.0f} MB (blocks kept for prefix reuse)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
