"""Batch-1 bf16 decode of a Llama-3-8B-shaped model with random weights on a GPU: tokens/s, and the
weight bytes read per second as a fraction of the device's measured memory bandwidth.

    .venv/bin/python benchmarks/gpu_decode.py                      # llama-3-8b shape, cuda, bfloat16
    .venv/bin/python benchmarks/gpu_decode.py --layers 4           # fewer layers (smaller GPUs)
    .venv/bin/python benchmarks/gpu_decode.py --device cpu --preset tiny --dtype float32   # smoke run

The bandwidth is measured here, by timing a large device-to-device copy (bytes read + written per
second). Decode runs ``Transformer.forward`` with a static KV cache after a prompt of --context
tokens; a step reads every weight once, so weight bytes / step time is the bandwidth it reaches.
Random weights are fine: speed does not depend on the values. (No GPU was available where this
was written; the CPU smoke run is what the test suite exercises.)
"""

import argparse
import statistics
import time

import torch

from llama3 import KVCache, ModelArgs, Transformer

TINY = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=1000, max_seq_len=1024)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3-8b", help="a llama3 preset, or 'tiny' for a smoke run")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--copy-mb", type=int, default=1024, help="size of the bandwidth test buffer")
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu --preset tiny for a smoke run")
    args = ModelArgs(**TINY) if a.preset == "tiny" else ModelArgs.from_preset(a.preset)
    args = args.replace(max_seq_len=max(args.max_seq_len if a.preset == "tiny" else 0, a.context + a.steps + 1),
                        max_batch_size=1)
    if a.layers:
        args = args.replace(n_layers=a.layers)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bandwidth = copy_bandwidth(device, a.copy_mb)
    model = build(args, device, dtype)
    # every weight once per token (a tied table is counted once: the lookup reads a single row of it)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    cache = KVCache(args, max_batch_size=1, max_seq_len=args.max_seq_len, dtype=dtype, device=device)
    with torch.inference_mode():
        model(torch.randint(0, args.vocab_size, (1, a.context), device=device), start_pos=0, cache=cache,
              last_only=True)
        token = torch.tensor([[1]], device=device)
        times = []
        for i in range(a.steps):
            sync(device)
            t = time.perf_counter()
            logits = model(token, start_pos=a.context + i, cache=cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    reached = weight_bytes / step / 1e9
    print(f"device: {name}; torch {torch.__version__}; {a.dtype}; preset {a.preset}, {args.n_layers} layers, "
          f"{weight_bytes / 1e9:.2f} GB of weights; prompt {a.context} tokens, {a.steps} decode steps")
    print(f"measured copy bandwidth: {bandwidth:.0f} GB/s")
    print(f"decode: {1 / step:.1f} tokens/s, {step * 1e3:.2f} ms/step (median), weights read at {reached:.0f} GB/s "
          f"= {100 * reached / bandwidth:.0f}% of the measured bandwidth")


if __name__ == "__main__":
    main()
