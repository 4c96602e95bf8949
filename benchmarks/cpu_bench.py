"""Decode and prefill speed against llama.cpp and transformers, in one run, alternating.

    .venv/bin/python benchmarks/cpu_bench.py            # = llama3 bench --compare llama.cpp,transformers
    .venv/bin/python benchmarks/cpu_bench.py --json out.json

Peers are optional: install llama-cpp-python (builds llama.cpp, ~10 min) and transformers.
"""

import argparse
import json

from llama3.bench import format_table, run_bench

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report here")
    a = p.parse_args()
    report = run_bench(a.model, a.prompt_tokens, a.new_tokens, a.repeats, a.threads, ["llama.cpp", "transformers"])
    print(format_table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
