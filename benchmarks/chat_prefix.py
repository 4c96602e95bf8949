"""Prefix reuse pays: time to first token of a chat's next turn when the history is already in the cache,
against re-prefilling the whole conversation (what every turn cost before the paged cache).

    .venv/bin/python benchmarks/chat_prefix.py [--model M] [--history 2000] [--repeats 5]

Builds a conversation whose rendered history is about --history tokens, answers it once (filling the
cache), then times the next turn's first token with prefix reuse on and off, alternating.
"""

import argparse
import os
import platform
import statistics
import time

import torch

import llama3
from llama3.generation import Generator
from llama3.sampling import SamplingParams

FILLER = ("The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report, "
          "which covers revenue, costs, hiring plans and the new office in Lisbon. ")


def conversation(llm, history_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    while len(llm.chat_prompt(messages)[1]) < history_tokens:
        messages += [{"role": "user", "content": FILLER * 4}, {"role": "assistant", "content": FILLER * 3}]
    return messages


def ttft(gen: Generator, ids: list[int]) -> tuple[float, int]:
    """(seconds to the first token, prompt tokens reused from the cache)."""
    start = time.perf_counter()
    requests = gen.submit([ids], SamplingParams(max_new_tokens=1, temperature=0))
    for _ in gen.stream(requests):
        pass
    return time.perf_counter() - start, requests[0].cached_tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--history", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    llm = llama3.load(a.model, quiet=True)
    messages = conversation(llm, a.history)
    _, history_ids = llm.chat_prompt(messages)
    turns = [llm.chat_prompt(messages + [{"role": "user", "content": f"Question {i}: summarise the report in "
                                                                     f"{i + 1} sentences."}])[1]
             for i in range(a.repeats)]  # a new question each time: only the history can come from the cache
    reuse = Generator(llm.model, llm.tokenizer, max_batch=1)
    fresh = Generator(llm.model, llm.tokenizer, max_batch=1, prefix_caching=False)
    for _ in reuse.run([history_ids], SamplingParams(max_new_tokens=1, temperature=0)):
        pass  # the first turn: its history is now in the cache
    times = {"reuse": [], "re-prefill": []}
    for ids in turns:
        times["re-prefill"].append(ttft(fresh, ids)[0])
        seconds, cached = ttft(reuse, ids)
        times["reuse"].append(seconds)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    r, f = statistics.median(times["reuse"]), statistics.median(times["re-prefill"])
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {os.path.basename(llm.path)}; next turn of a {len(history_ids)}-token history "
          f"({len(turns[0])} tokens in all), median of {a.repeats}")
    print(f"time to first token, re-prefilling everything: {f * 1000:.1f} ms")
    print(f"time to first token, history reused from the cache: {r * 1000:.1f} ms "
          f"({cached} prompt tokens reused)")
    print(f"speed-up: {f / r:.1f}x")


if __name__ == "__main__":
    main()
