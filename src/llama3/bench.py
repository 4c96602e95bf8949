"""``llama3 bench``: prefill and decode speed, side by side with llama.cpp and transformers.

Each engine runs in its own worker process (so its peak RSS is its own), loads the model once,
and the parent asks the workers for one repeat at a time in turn, so every engine sees the same
machine conditions. All engines get the same token ids, the same number of new tokens (greedy,
no stop token) and the same thread count.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
               "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
               "produce books quickly and cheaply. Within fifty years, presses had spread across Europe, and "
               "the number of books in circulation grew from thousands to millions. ")


def machine_info(threads: int) -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "python": platform.python_version()}


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = PROMPT_TEXT
    ids = tokenizer.encode(text)
    while len(ids) < n:
        text += PROMPT_TEXT
        ids = tokenizer.encode(text)
    return ids[:n]


# ------------------------------------------------------------------------------- workers
class OursEngine:
    name = "llama3"

    def __init__(self, model, threads, dtype, quantize):
        import torch

        import llama3
        from llama3.generation import Generator

        torch.set_num_threads(threads)
        self.llm = llama3.load(model, dtype=dtype, quantize=quantize, quiet=True, device="cpu")
        # no prefix reuse: every repeat prefills the whole prompt, as the peers do
        self.generator = Generator(self.llm.model, self.llm.tokenizer, max_batch=1, prefix_caching=False)

    @property
    def path(self) -> str:
        from llama3.quantize import describe

        return f"{describe(self.llm.model)}; {self.generator.engine.decoder.describe()}"

    def run(self, ids, new_tokens):
        from llama3.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
        t0 = time.perf_counter()
        first = None
        out = []
        for step in self.generator.run([ids], params, stop_ids=set()):
            if first is None:
                first = time.perf_counter()
            out.append(step.token_id)
        end = time.perf_counter()
        return t0, first, end, out


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, model, threads, prompt_tokens, new_tokens):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(model), n_ctx=prompt_tokens + new_tokens + 16, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False)
        import llama_cpp

        self.path = f"llama-cpp-python {llama_cpp.__version__}"

    def run(self, ids, new_tokens):
        self.llm.reset()
        t0 = time.perf_counter()
        gen = self.llm.generate(ids, temp=0.0, top_k=1, reset=True)
        out = [next(gen)]
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            out.append(next(gen))
        return t0, first, time.perf_counter(), out


class TransformersEngine:
    name = "transformers"

    def __init__(self, model, threads):
        import logging as std_logging

        import torch

        # transformers imports torchao when it is installed, whose CUDA-only extensions then log that they
        # cannot load on a CPU build of torch: noise, not a failure
        std_logging.getLogger("torchao").setLevel(std_logging.ERROR)
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        torch.set_num_threads(threads)
        logging.disable_progress_bar()
        logging.set_verbosity_error()
        model = str(model)
        if model.endswith(".gguf"):
            self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(model), gguf_file=os.path.basename(model),
                                                              dtype=torch.float32).eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.path = f"transformers {transformers.__version__} (float32)"

    def run(self, ids, new_tokens):
        import torch

        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(torch.tensor([ids]), use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens = [token]
            first = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = self.model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
                tokens.append(token)
        return t0, first, time.perf_counter(), tokens


def worker(argv: list[str]) -> None:
    """A worker process: load, answer "run" lines with one measurement, "quit" with the peak RSS."""
    cfg = json.loads(argv[0])
    engine_name, model, threads = cfg["engine"], cfg["model"], cfg["threads"]
    if engine_name == "llama3":
        engine = OursEngine(model, threads, cfg["dtype"], cfg["quantize"])
    elif engine_name == "llama.cpp":
        engine = LlamaCppEngine(model, threads, len(cfg["ids"]), cfg["new_tokens"])
    else:
        engine = TransformersEngine(model, threads)
    ids, new_tokens = cfg["ids"], cfg["new_tokens"]
    print(json.dumps({"ready": True, "path": engine.path}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        t0, first, end, out = engine.run(ids, new_tokens)
        print(json.dumps({"prefill_s": first - t0, "decode_s": end - first, "tokens": out}), flush=True)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "path": engine.path}),
          flush=True)


def _available(engine: str) -> tuple[bool, str]:
    import importlib.util

    module = {"llama.cpp": "llama_cpp", "transformers": "transformers"}[engine]
    if importlib.util.find_spec(module) is None:
        return False, f"{engine} is not installed (pip install {'llama-cpp-python' if module == 'llama_cpp' else module})"
    return True, ""


def run_bench(model=None, prompt_tokens: int = 256, new_tokens: int = 128, repeats: int = 5,
              threads: int | None = None, compare: list[str] = (), dtype: str = "auto", quantize: str = "auto",
              progress=None) -> dict:
    import torch

    import llama3
    from llama3.weights import default_model_path

    model = str(default_model_path() if model is None else model)
    threads = threads or min(os.cpu_count() or 1, torch.get_num_threads())
    tokenizer = llama3.load_tokenizer(model)
    ids = prompt_ids(tokenizer, prompt_tokens)
    engines = ["llama3"]
    skipped = {}
    for peer in compare:
        ok, why = _available(peer)
        (engines.append(peer) if ok else skipped.__setitem__(peer, why))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    workers = {}
    for name in engines:
        cfg = dict(engine=name, model=model, threads=threads, ids=ids, new_tokens=new_tokens, dtype=dtype,
                   quantize=quantize)
        proc = subprocess.Popen([sys.executable, "-m", "llama3.bench", "--worker", json.dumps(cfg)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        workers[name] = proc
    info = {}
    for name, proc in workers.items():
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {name} worker failed to start")
        info[name] = json.loads(line)
    samples = {name: [] for name in engines}
    outputs = {}
    for r in range(repeats):
        for name, proc in workers.items():  # alternate: one repeat of each engine in turn
            proc.stdin.write("run\n")
            proc.stdin.flush()
            result = json.loads(proc.stdout.readline())
            outputs[name] = result.pop("tokens")
            samples[name].append(result)
            if progress:
                progress(name, r)
    results = {}
    for name, proc in workers.items():
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        last = json.loads(proc.stdout.readline())
        rss, info[name]["path"] = last["peak_rss_mb"], last["path"]
        proc.wait(timeout=60)
        pre = [prompt_tokens / s["prefill_s"] for s in samples[name]]
        dec = [(new_tokens - 1) / s["decode_s"] for s in samples[name]]
        ttft = [s["prefill_s"] * 1000 for s in samples[name]]
        results[name] = {
            "path": info[name]["path"],
            "prefill_tok_s": {"min": min(pre), "median": statistics.median(pre), "max": max(pre)},
            "decode_tok_s": {"min": min(dec), "median": statistics.median(dec), "max": max(dec)},
            "ttft_ms": {"min": min(ttft), "median": statistics.median(ttft), "max": max(ttft)},
            "peak_rss_mb": rss,
        }
    ours = results["llama3"]
    for name in engines[1:]:
        results[name]["ratio_ours_over_peer"] = {
            "prefill": ours["prefill_tok_s"]["median"] / results[name]["prefill_tok_s"]["median"],
            "decode": ours["decode_tok_s"]["median"] / results[name]["decode_tok_s"]["median"]}
        results[name]["same_greedy_tokens"] = sum(a == b for a, b in zip(outputs[name], outputs["llama3"]))
    return {"machine": machine_info(threads), "model": model, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats, "results": results, "skipped": skipped}


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads",
             f"model: {os.path.basename(report['model'])}; prompt {report['prompt_tokens']} tokens, "
             f"{report['new_tokens']} new tokens, greedy, {report['repeats']} repeats (median [min-max])", "",
             "| engine | prefill tok/s | decode tok/s | TTFT ms | peak RSS MB | ours / peer (prefill, decode) |",
             "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        def cell(d, fmt="{:.1f}"):
            return f"{fmt.format(d['median'])} [{fmt.format(d['min'])}-{fmt.format(d['max'])}]"
        ratio = r.get("ratio_ours_over_peer")
        ratio_text = f"{ratio['prefill']:.2f}x, {ratio['decode']:.2f}x" if ratio else "-"
        lines.append(f"| {name} ({r['path']}) | {cell(r['prefill_tok_s'])} | {cell(r['decode_tok_s'])} | "
                     f"{cell(r['ttft_ms'], '{:.0f}')} | {r['peak_rss_mb']:.0f} | {ratio_text} |")
    for name, why in report["skipped"].items():
        lines.append(f"\n{name}: skipped ({why})")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
