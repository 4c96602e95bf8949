"""What each decode speed-up buys, measured on its own: ms per decode step (batch 1) after a
256-token prefill, for each execution path of the same model, in one process.

    .venv/bin/python benchmarks/decode_ablation.py [--model M] [--steps 64] [--threads N]

Rows, from the plain reference to the default, each a decoder of llama3.engine over the paged cache:
  TorchDecoder, float32 weights                     the exact reference path (quantize=None)
  TorchDecoder, quantized blocks, per-op C kernels   the GGUF's blocks in C matmuls; PyTorch does the rest
  TorchDecoder, quantized, PyTorch fallback kernels  the same without the C library (LLAMA3_NO_KERNELS path)
  CDecoder, 1 thread / N threads                     the whole step in one C call
and the C step's cost at other context positions, with a float16 and a float32 cache (attention reads
the whole cache, so its bytes matter more as the context grows).
"""

import argparse
import os
import platform
import statistics
import time

import torch

import llama3
from llama3 import kernels
from llama3.engine import PagedKVCache, TorchDecoder
from llama3.engine.cdecoder import CDecoder


def time_steps(decoder, sid, steps: int, start: int, threads: int | None = None) -> float:
    """Median ms per step over ``steps`` decode steps at positions start, start+1, ..."""
    if threads is not None:
        decoder.tuners[False].best = threads
    times = []
    for i in range(steps):
        t = time.perf_counter()
        decoder.step([42], [start + i], [sid])
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def prepared(decoder_cls, llm, kv_dtype, n=256, length=2048 + 128):
    """A decoder over a fresh cache holding one sequence prefilled with n tokens, room for ``length``."""
    cache = PagedKVCache(llm.args, length, dtype=kv_dtype, prefix_caching=False)
    decoder = decoder_cls(llm.model, cache)
    sid, _ = cache.open([0])
    cache.reserve(sid, length)
    decoder.prefill(list(range(100, 100 + n)), sid, 0)
    return decoder, sid


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

    def add(name, ms):
        print(f"| {name} | {ms:.2f} | {1000 / ms:.1f} |", flush=True)

    print("| path | ms / step | tokens/s |\n|---|---|---|")
    exact = llama3.load(a.model, quantize=None, quiet=True)
    add("TorchDecoder, float32 weights, float32 cache", time_steps(*prepared(TorchDecoder, exact, torch.float32),
                                                                   a.steps, 256))
    del exact
    llm = llama3.load(a.model, quiet=True)
    d, sid = prepared(TorchDecoder, llm, torch.float16)
    add("TorchDecoder, quantized blocks, per-op C kernels", time_steps(d, sid, a.steps, 256))
    saved = kernels._lib
    kernels._lib = None  # the PyTorch fallback for every kernel, as without a compiler
    try:
        add("TorchDecoder, quantized blocks, PyTorch fallback kernels", time_steps(d, sid, max(4, a.steps // 8), 256))
    finally:
        kernels._lib = saved
    why = CDecoder.why_not(llm.model)
    if why is not None:
        print(f"\nthe C step is unavailable: {why}")
        return
    for kv in (torch.float16, torch.float32):
        d, sid = prepared(CDecoder, llm, kv)
        name = str(kv).replace("torch.", "")
        for n in sorted({1, threads}):
            add(f"CDecoder, {name} cache, {n} thread{'s' if n > 1 else ''}", time_steps(d, sid, a.steps, 256, n))
        for start in (0, 1024, 2048):
            add(f"CDecoder, {name} cache, {threads} threads, at position {start}",
                time_steps(d, sid, a.steps, start, threads))


if __name__ == "__main__":
    main()
