"""The GPU path measured on a Llama-3.1-8B-shaped model with random weights (speed does not depend on them).

    .venv/bin/python benchmarks/gpu_decode.py                          # everything, on cuda
    .venv/bin/python benchmarks/gpu_decode.py --batches 1 --no-int4    # batch-1 bf16 only
    .venv/bin/python benchmarks/gpu_decode.py --device cpu --preset tiny --dtype float32   # smoke run (tests)

What it prints, each line with the device:
  - the device's copy bandwidth, measured here (a large device-to-device copy: bytes read + written / s);
  - batch-1 decode of the engine's decoder (``StaticDecoder``: the sync-free step, compiled and replayed as
    CUDA graphs on CUDA) in bf16 and int4 (torchao, ``llama3.engine.gpu_weights``): tokens/s, and the
    weight bytes a step reads / step time as a fraction of the copy bandwidth (the roofline of batch 1);
  - compile time of each shape (first call: inductor + graph capture; cached in ~/.cache/llama3/inductor);
  - prefill tokens/s at 512 and 4096 tokens (chunked ``Transformer.forward``, SDPA flash/efficient kernels),
    the first of which is the time to first token;
  - decode throughput at batch 8 / 32 / 64 (tokens/s over all rows) and its ratio to batch 1;
  - the continuous-batching Engine (the server's loop without HTTP) with 1 / 8 / 32 / 64 concurrent requests:
    generated tokens/s in all and the mean time to first token;
  - peak device memory;
  - transformers' ``LlamaForCausalLM`` with a static cache and ``torch.compile(mode="reduce-overhead")``
    decoding the same shape in the same run (where transformers is installed; CUDA only).
A step here is what the engine runs per token: the decoder's step, a greedy pick on the device and one
transfer of the chosen tokens.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from llama3 import ModelArgs, Transformer
from llama3.engine import Engine, PagedKVCache, Request, StaticDecoder
from llama3.sampling import SamplingParams
from llama3.tokenizer import Tokenizer
from llama3.engine.gpu_weights import to_device, weight_bytes

TINY = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=1000, max_seq_len=1024)


def say(*parts):
    print(*parts, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, mb: int) -> float:
    """GB/s of a device-to-device copy (each byte read once and written once)."""
    n = mb * 2**20 // 4
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    a.fill_(1.0)
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n * 4 / min(times) / 1e9


def build(args: ModelArgs, device, dtype) -> Transformer:
    model = Transformer(args, device="meta")
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.reset_rope(device)
    return model.eval()


class Bench:
    def __init__(self, model: Transformer, dtype, device, tokens: int, compile: str | None):
        self.model, self.device = model, device
        self.cache = PagedKVCache(model.args, tokens, dtype=dtype, device=device, prefix_caching=False)
        self.decoder = StaticDecoder(model, self.cache, compile=compile)
        self.gen = torch.Generator().manual_seed(0)

    def prompt(self, n: int) -> list[int]:
        return torch.randint(0, self.model.args.vocab_size, (n,), generator=self.gen).tolist()

    def prefill(self, n: int) -> tuple[int, float]:
        """A new sequence with ``n`` prompt tokens; returns (its id, seconds to its first token's logits)."""
        sid, _ = self.cache.open([], reuse=False)
        self.cache.reserve(sid, n + 1)
        tokens = self.prompt(n)
        sync(self.device)
        start = time.perf_counter()
        logits = self.decoder.prefill(tokens, sid, 0)  # on the host: the sync is included
        seconds = time.perf_counter() - start
        self.cache.append(sid, tokens)
        int(logits.argmax())
        return sid, seconds

    def decode(self, batch: int, context: int, steps: int) -> tuple[float, float]:
        """(median seconds per step, first step's seconds) for ``batch`` sequences after ``context`` tokens."""
        sids = [self.prefill(context)[0] for _ in range(batch)]
        for s in sids:
            self.cache.reserve(s, context + steps + 2)
        tokens, times = [1] * batch, []
        for i in range(steps + 1):
            positions = [self.cache.length(s) for s in sids]
            start = time.perf_counter()
            logits = self.decoder.step_on_device(tokens, positions, sids)
            tokens = logits.argmax(-1).tolist()  # the one transfer: syncs with the step
            times.append(time.perf_counter() - start)
            for s, t in zip(sids, tokens):
                self.cache.append(s, [t])
        for s in sids:
            self.cache.close(s)
        return statistics.median(times[1:]), times[0]


class NumberTokenizer(Tokenizer):
    """Every id is one byte "x": enough for the engine's detokenizer, and no id ever stops a sequence."""

    def __init__(self, vocab: int):
        self.path, self.bos_id, self.eos_id, self.add_bos = "numbers", None, None, False
        self.special_tokens, self.stop_ids = {}, set()
        self._token_bytes = [b"x"] * vocab


def engine_run(model: Transformer, clients: int, context: int, tokens: int, decoder: str) -> tuple[float, float]:
    """``clients`` requests at once through the continuous-batching Engine (the server's loop, without HTTP):
    (generated tokens/s over all, mean seconds to each request's first token)."""
    engine = Engine(model, NumberTokenizer(model.args.vocab_size), max_batch=clients, decoder=decoder,
                    context=context + tokens + 2)
    g = torch.Generator().manual_seed(clients)
    prompts = [torch.randint(0, model.args.vocab_size, (context,), generator=g).tolist() for _ in range(clients)]
    start = time.perf_counter()
    for p in prompts:
        engine.add(Request(p, SamplingParams(max_new_tokens=tokens, temperature=0)))
    first, generated = {}, 0
    for step in engine.run():
        first.setdefault(step.request_id, time.perf_counter() - start)
        generated += 1
    return generated / (time.perf_counter() - start), statistics.mean(first.values())


def transformers_decode(args: ModelArgs, device, dtype, context: int, steps: int) -> float | None:
    """Seconds per decode step of transformers' compiled static-cache generate on the same shape."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = LlamaConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                         num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
                         vocab_size=args.vocab_size, max_position_embeddings=args.max_seq_len,
                         rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta)
    with torch.device(device):  # built in ``dtype`` on the device: no float32 copy of 8B parameters
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, args.vocab_size, (1, context), device=device)

    def run(n):
        sync(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    run(steps), run(steps)  # compile and capture
    return (run(steps + 1) - run(1)) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.1-8b", help="a llama3 preset, or 'tiny' for a smoke run")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batches", default="1,8,32,64", help="decode batch sizes (1 is always measured)")
    p.add_argument("--prefill", default="512,4096", help="prompt lengths whose prefill is timed")
    p.add_argument("--compile", default=None, choices=["eager", "default", "reduce-overhead"],
                   help="the decode step's compilation (default: reduce-overhead on CUDA, eager on CPUs)")
    p.add_argument("--no-int4", action="store_true", help="skip the int4 (torchao) run")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' compiled static cache")
    p.add_argument("--copy-mb", type=int, default=1024, help="size of the bandwidth test buffer")
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu --preset tiny --dtype float32 for a smoke run")
    batches = sorted({1, *(int(b) for b in a.batches.split(","))})
    prefills = [int(n) for n in a.prefill.split(",") if n]
    args = ModelArgs(**TINY) if a.preset == "tiny" else ModelArgs.from_preset(a.preset)
    longest = max([a.context + a.steps + 2, *(n + 1 for n in prefills)])
    args = args.replace(max_seq_len=max(args.max_seq_len if a.preset == "tiny" else 0, longest))
    if a.layers:
        args = args.replace(n_layers=a.layers)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tag = f"[{name}]"
    say(f"device: {name}; torch {torch.__version__}; {a.dtype}; preset {a.preset}, {args.n_layers} layers")
    bandwidth = copy_bandwidth(device, a.copy_mb)
    say(f"{tag} measured copy bandwidth: {bandwidth:.0f} GB/s")

    model = build(args, device, dtype)
    tokens = max(batches) * (a.context + a.steps + 2) + sum(prefills) + 2 * 64 * 32
    bench = Bench(model, dtype, device, tokens, a.compile)
    say(f"{tag} decoder: {bench.decoder.describe()}")

    def batch1(bench: Bench, label: str) -> float:
        step, first = bench.decode(1, a.context, a.steps)
        wbytes = weight_bytes(bench.model)
        reached = wbytes / step / 1e9
        say(f"{tag} {label} batch 1: {1 / step:.1f} tokens/s, {step * 1e3:.2f} ms/step (median of {a.steps}); "
            f"{wbytes / 1e9:.2f} GB of weights read at {reached:.0f} GB/s = {100 * reached / bandwidth:.0f}% "
            f"of the measured bandwidth; first step (compile + capture) {first:.1f} s")
        return step

    step1 = batch1(bench, a.dtype)
    for n in prefills:
        bench.prefill(min(n, 64))  # warm the kernels of this path
        sid, seconds = bench.prefill(n)
        bench.cache.close(sid)
        say(f"{tag} prefill {n} tokens: {n / seconds:.0f} tokens/s; time to first token {seconds * 1e3:.1f} ms")
    for b in batches[1:]:
        step, first = bench.decode(b, a.context, a.steps)
        say(f"{tag} {a.dtype} batch {b}: {b / step:.0f} tokens/s ({step * 1e3:.2f} ms/step) = "
            f"{step1 * b / step:.1f}x batch 1; first step {first:.1f} s")
    for clients in batches:  # compiled shapes are reused: the same model and step function
        rate, ttft = engine_run(model, clients, a.context, a.steps, "static")
        say(f"{tag} engine, {clients} concurrent requests of {a.context} + {a.steps} tokens: {rate:.0f} generated "
            f"tokens/s in all, mean time to first token {ttft * 1e3:.0f} ms")
    for shape, seconds in bench.decoder.compile_seconds.items():
        say(f"{tag} compile: batch {shape[0]} x {shape[1]} blocks: {seconds:.1f} s")
    if device.type == "cuda":
        say(f"{tag} peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")

    if a.no_int4 or device.type != "cuda":
        say(f"{tag} int4: skipped" + ("" if a.no_int4 else " (tinygemm's int4 kernel is CUDA-only)"))
    else:
        bench.model = to_device(model, device, "int4")  # in place: the bf16 matrices are replaced
        bench.decoder = StaticDecoder(bench.model, bench.cache, compile=a.compile)
        step4 = batch1(bench, "int4")
        say(f"{tag} int4 / {a.dtype} batch-1 speed: {step1 / step4:.2f}x")
    del bench, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if a.no_transformers or device.type != "cuda":
        say(f"{tag} transformers: skipped" + ("" if a.no_transformers else " (compiled static cache: CUDA only here)"))
    else:
        step_t = transformers_decode(args, device, dtype, a.context, a.steps)
        if step_t is None:
            say(f"{tag} transformers: not installed")
        else:
            say(f"{tag} transformers static cache + torch.compile batch 1: {1 / step_t:.1f} tokens/s; "
                f"llama3 / transformers: {step_t / step1:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
