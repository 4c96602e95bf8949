"""What each decode speed-up buys, measured on its own: ms per decode step (batch 1) after a
256-token prefill, for each execution path of the same model, in one process.

    .venv/bin/python benchmarks/decode_ablation.py [--model M] [--steps 64] [--threads N]

Rows, from the plain reference to the default:
  forward, float32, separate wq/wk/wv and w1/w3    the exact reference path (quantize=None, fuse=False)
  forward, float32, fused qkv / w13                 one matmul instead of three and two
  forward, quantized blocks, per-op C kernels        the GGUF's blocks in C matmuls; PyTorch does the rest
  forward, quantized, PyTorch fallback kernels       the same without the C library (LLAMA3_NO_KERNELS path)
  fast step, 1 thread / N threads                    the whole step in one C call (llama3.fastpath)
and the fast step's cost at other context positions (attention reads the whole cache).
"""

import argparse
import os
import platform
import statistics
import time

import torch

import llama3
from llama3 import kernels
from llama3.fastpath import FastDecoder
from llama3.model import KVCache


def time_steps(step, steps: int, start: int) -> float:
    """Median ms per step over ``steps`` decode steps at positions start, start+1, ..."""
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(start + i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def forward_step(llm, cache):
    model = llm.model

    def step(pos):
        with torch.inference_mode():
            model(torch.tensor([[42]]), start_pos=pos, cache=cache)
    return step


def prefill(llm, cache, n=256):
    with torch.inference_mode():
        llm.model(torch.arange(100, 100 + n)[None], start_pos=0, cache=cache, last_only=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads; "
          f"median ms per decode step after a 256-token prefill, {a.steps} steps\n")
    rows = []

    def add(name, ms):
        rows.append((name, ms))
        print(f"| {name} | {ms:.2f} | {1000 / ms:.1f} |", flush=True)

    print("| path | ms / step | tokens/s |\n|---|---|---|")
    for fuse, name in ((False, "forward, float32, separate wq/wk/wv and w1/w3"), (True, "forward, float32, fused qkv / w13")):
        llm = llama3.load(a.model, quantize=None, fuse=fuse, quiet=True)
        cache = KVCache(llm.args, 1, 512)
        prefill(llm, cache)
        add(name, time_steps(forward_step(llm, cache), a.steps, 256))
        del llm, cache
    llm = llama3.load(a.model, quiet=True)
    cache = KVCache(llm.args, 1, 512 + 1024)
    prefill(llm, cache)
    add("forward, quantized blocks, per-op C kernels", time_steps(forward_step(llm, cache), a.steps, 256))
    saved = kernels._lib
    kernels._lib = None  # the PyTorch fallback for every kernel, as without a compiler
    try:
        add("forward, quantized blocks, PyTorch fallback kernels",
            time_steps(forward_step(llm, cache), max(4, a.steps // 8), 256))
    finally:
        kernels._lib = saved
    fast = FastDecoder.for_model(llm.model)
    if fast is None:
        print(f"\nfast step unavailable: {FastDecoder.why_not(llm.model)}")
        return
    for n in sorted({1, threads}):
        add(f"fast step (one C call), {n} thread{'s' if n > 1 else ''}",
            time_steps(lambda pos: fast([42], [pos], cache, threads=n), a.steps, 256))
    for start in (0, 1024):
        add(f"fast step, {threads} threads, at position {start}",
            time_steps(lambda pos: fast([42], [pos], cache, threads=threads), a.steps, start))


if __name__ == "__main__":
    main()
