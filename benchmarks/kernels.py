"""How fast the matrix-vector kernels read weights: GB/s of weight bytes per kind, for each ISA library
the CPU runs, against a STREAM-like read bandwidth measured in the same run.

    .venv/bin/python benchmarks/kernels.py [--kinds Q4_K,Q6_K,...] [--shapes 2048x2048,...] [--n 1,4]
                                           [--threads 1,2] [--isas avx2,avx512] [--seconds 0.5]

Batch-1 decode is memory-bound: a kernel is as fast as it can be when it reads its weights at the
machine's DRAM bandwidth. Each measurement cycles through enough random copies of the matrix (about
``--footprint`` MB) that the weights come from DRAM, not the caches, and hands them to the kernels in
one call (``kernels.matmul_list``: one worksharing loop over all their rows), so that call overhead
stays out of the figure; it then reports weight bytes read per second. The read bandwidth is
``torch.sum`` over a buffer of the same size on the same threads. ``--footprint 1`` keeps a single copy,
small enough for the caches: the kernels' compute ceiling instead of the memory's.

Timings taken while other jobs share the machine are noisy (2 threads then often lose to 1): compare
figures from one run, and measure alone for absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from llama3 import kernels
from llama3.quantize import QuantTensor

DEFAULT_KINDS = "Q4_K,Q6_K,Q8_0,Q4_0,F16,BF16,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K,Q5_K,IQ4_NL,IQ4_XS,F32"


def best_rate(run, nbytes: int, seconds: float) -> float:
    """GB/s of the fastest of repeated runs (at least 3, about ``seconds`` in all)."""
    run()  # warm up
    best, spent, count = float("inf"), 0.0, 0
    while count < 3 or spent < seconds:
        t = time.perf_counter()
        run()
        dt = time.perf_counter() - t
        best, spent, count = min(best, dt), spent + dt, count + 1
    return nbytes / best / 1e9


def read_bandwidth(mb: int, threads: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    buf = torch.ones(mb * (1 << 20) // 4)
    return best_rate(lambda: buf.sum(), buf.numel() * 4, seconds)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default=DEFAULT_KINDS)
    p.add_argument("--shapes", default="2048x2048,8192x2048,14336x4096")
    p.add_argument("--n", default="1,4", help="activation rows")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--isas", default=",".join(kernels.available_isas()))
    p.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    p.add_argument("--footprint", type=int, default=256, help="MB of weight copies cycled through")
    a = p.parse_args()
    kinds, isas = a.kinds.split(","), [i for i in a.isas.split(",") if i]
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ns, threads = [int(v) for v in a.n.split(",")], [int(v) for v in a.threads.split(",")]
    if not isas:
        raise SystemExit(f"no C kernels here: {kernels.why_not()}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"ISAs {', '.join(isas)}; GB/s of weight bytes (best of repeated runs over ~{a.footprint} MB of copies)")
    print("\n| read bandwidth (torch.sum) | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads) + " |")
    print("|---|" + "---|" * len(threads))
    print("| GB/s | " + " | ".join(f"{read_bandwidth(a.footprint, t, a.seconds):.1f}" for t in threads) + " |")
    cols = [(isa, n, t) for isa in isas for n in ns for t in threads]
    for rows, k in shapes:
        print(f"\n**{rows} x {k}**\n")
        print("| kind | MB | " + " | ".join(f"{isa} n={n} t={t}" for isa, n, t in cols) + " |")
        print("|---|---|" + "---|" * len(cols))
        for kind in kinds:
            if k % kernels.BLOCK[kind][0]:
                continue
            g = torch.Generator().manual_seed(0)
            first = QuantTensor.random(kind, rows, k, g)
            copies = [first] + [QuantTensor.random(kind, rows, k, g)
                                for _ in range(max(1, a.footprint * (1 << 20) // first.nbytes) - 1)]
            nbytes = sum(c.nbytes for c in copies)
            rates = []
            for isa, n, t in cols:
                x = torch.randn(n, k)
                rates.append(best_rate(lambda: kernels.matmul_list(copies, x, isa=isa, threads=t), nbytes,  # noqa: B023
                                       a.seconds))
            print(f"| {kind} | {first.nbytes / 1e6:.1f} | " + " | ".join(f"{r:.1f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
