"""Tensor parallelism: the same model on 1 rank and on N ranks (2 by default; 4 where there are cores or
GPUs): prefill and decode tokens/s seen by rank 0, each rank's peak resident memory and the weight bytes
it holds, and the time each rank spent inside collectives (all-reduces and the logits' all-gather).

    .venv/bin/python benchmarks/tensor_parallel.py [--model PATH] [--ranks 1,2] [--quantize none] [--device cpu]

Every configuration runs in fresh processes (``llama3.parallel.runtime.run_ranks``); 1 rank is the same
tensor-parallel code path on a world of one (collectives of one rank), so the comparison isolates the
split. On a 2-core CPU machine 2 gloo ranks share the cores that 1 rank had alone: the speed columns
then only measure the overhead of splitting; the memory columns are the point (each rank must hold
about half). On a multi-GPU machine (``--device cuda``, NCCL) the speed columns are the real figure.
The default ``--quantize none`` holds float32 weights, large enough next to the runtime's own memory
that the halving shows in the resident set too.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch


def _rank(session, model, quantize, dtype, prompt_tokens, new_tokens, repeats):
    from llama3.engine import Request
    from llama3.parallel import load, weight_bytes, worker_loop
    from llama3.parallel.runtime import STOP
    from llama3.sampling import SamplingParams

    llm = load(session, model, dtype=dtype, quantize=quantize)
    shard = llm if session.rank else llm.model
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"rank": session.rank, "weights_mb": weight_bytes(shard) / 1e6}
    if session.rank:
        worker_loop(llm, session)
    else:
        ids = [(i * 7919) % 1000 + 100 for i in range(prompt_tokens)]  # fixed ids inside every vocabulary
        engine, runs = llm.generator.engine, []
        for r in range(repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            first = None
            engine.add(Request(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0), stop_ids=set()))
            for _ in engine.run():
                first = first or time.perf_counter()
            end = time.perf_counter()
            if r:
                runs.append((prompt_tokens / (first - t0), (new_tokens - 1) / (end - first)))
        out.update(prefill_tok_s=statistics.median(p for p, _ in runs), decode_tok_s=statistics.median(d for _, d in runs),
                   decoder=llm.describe())
        session.send(STOP)
    out.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, loaded_rss_mb=loaded_mb,
               collective_s=shard.tp_stats.seconds, collective_calls=shard.tp_stats.calls,
               collective_mb=shard.tp_stats.bytes / 1e6)
    return out


def main() -> None:
    from llama3.parallel.runtime import run_ranks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--ranks", default="1,2", help="world sizes to compare (default: 1,2)")
    p.add_argument("--quantize", default="none", help="none (float weights, default), auto, int8, int4")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    cores = torch.get_num_threads()
    report = {}
    for world in (int(w) for w in a.ranks.split(",")):
        threads = a.threads or max(1, cores // world)
        ranks = run_ranks(_rank, world, a.model, a.quantize, a.dtype, a.prompt_tokens, a.new_tokens, a.repeats,
                          threads=threads, device=a.device, timeout=1800, collective_timeout=300)
        report[world] = {"threads_per_rank": threads, "ranks": ranks}
    if a.json:
        print(json.dumps(report, indent=2))
        return
    print(f"model: {a.model or 'SmolLM2-135M-Instruct (embedded)'}, quantize {a.quantize}, {a.device}; "
          f"prompt {a.prompt_tokens}, {a.new_tokens} new tokens, median of {a.repeats}")
    print(f"{'ranks':>5} {'threads':>7} {'prefill tok/s':>13} {'decode tok/s':>12}   per rank: weights MB / peak RSS MB "
          "/ s in collectives (calls)")
    for world, r in report.items():
        r0 = r["ranks"][0]
        per = "  ".join(f"[{x['weights_mb']:.0f} / {x['peak_rss_mb']:.0f} / {x['collective_s']:.2f} "
                        f"({x['collective_calls']})]" for x in r["ranks"])
        print(f"{world:>5} {r['threads_per_rank']:>7} {r0['prefill_tok_s']:>13.1f} {r0['decode_tok_s']:>12.1f}   {per}")


if __name__ == "__main__":
    main()
