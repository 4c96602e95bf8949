"""Peak memory while loading a ~1.2 GB float32 checkpoint of each format (random weights).

    .venv/bin/python benchmarks/load_memory.py [--dir /tmp/llama3-load]

Each load runs in a fresh process; we report its peak RSS above the RSS it had after importing
torch and llama3, divided by the loaded model's size. The loader builds the model on the meta
device and assigns tensors, so the target is at most 1.5x.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from llama3 import ModelArgs, Transformer

ARGS = ModelArgs(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, vocab_size=32000, ffn_hidden_dim=4096,
                 max_seq_len=2048)

CHILD = r"""
import json, sys, torch, llama3
from llama3.loading import build_model
from llama3.weights import load_checkpoint

def hwm_mb():  # peak resident set (anonymous + file-backed pages) so far
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

base = hwm_mb()
ckpt = load_checkpoint(sys.argv[1], quiet=True)
model = build_model(ckpt.args, ckpt.state)
peak = hwm_mb()
size = sum(p.numel() * p.element_size() for p in model.parameters())
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))  # touches every weight: memory-mapped pages become resident
print(json.dumps({"base_mb": base, "peak_mb": peak, "forward_mb": hwm_mb(), "model_mb": size / 2**20}))
"""


def write_all(folder):
    from safetensors.torch import save_file

    from llama3.weights.hf import HF_TO_META, meta_to_hf_qk

    torch.manual_seed(0)
    model = Transformer(ARGS)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # Hugging Face
    hf = os.path.join(folder, "hf")
    os.makedirs(hf, exist_ok=True)
    inverse = {}
    for h, m in HF_TO_META.items():
        for i in range(ARGS.n_layers if "{i}" in h else 1):
            inverse[m.format(i=i)] = h.format(i=i)
    hf_state = {}
    for name, t in state.items():
        if name.endswith("wq.weight"):
            t = meta_to_hf_qk(t, ARGS.n_heads)
        elif name.endswith("wk.weight"):
            t = meta_to_hf_qk(t, ARGS.kv_heads)
        hf_state[inverse[name]] = t.contiguous()
    save_file(hf_state, os.path.join(hf, "model.safetensors"))
    json.dump({"model_type": "llama", "hidden_size": ARGS.dim, "num_hidden_layers": ARGS.n_layers,
               "num_attention_heads": ARGS.n_heads, "num_key_value_heads": ARGS.kv_heads,
               "intermediate_size": ARGS.hidden_dim, "vocab_size": ARGS.vocab_size, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "max_position_embeddings": 2048}, open(os.path.join(hf, "config.json"), "w"))
    # Meta
    meta = os.path.join(folder, "meta")
    os.makedirs(meta, exist_ok=True)
    torch.save(state, os.path.join(meta, "consolidated.00.pth"))
    json.dump({"dim": ARGS.dim, "n_layers": ARGS.n_layers, "n_heads": ARGS.n_heads, "n_kv_heads": ARGS.kv_heads,
               "vocab_size": ARGS.vocab_size, "multiple_of": 1024, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5,
               "rope_theta": 500000.0},
              open(os.path.join(meta, "params.json"), "w"))
    # GGUF
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_loaders import write_gguf

    write_gguf(os.path.join(folder, "model.gguf"), ARGS, state, "F32")
    return {"hf": hf, "meta": meta, "gguf": os.path.join(folder, "model.gguf")}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    folder = a.dir or tempfile.mkdtemp(prefix="llama3-load-")
    try:
        paths = write_all(folder)
        print(f"model: {ARGS.num_params():,} parameters, float32")
        print("| format | model MB | peak RSS above baseline while loading | after a forward pass | ratio |\n"
              "|---|---|---|---|---|")
        for fmt, path in paths.items():
            out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            extra, fwd = r["peak_mb"] - r["base_mb"], r["forward_mb"] - r["base_mb"]
            ratio = max(extra, fwd) / r["model_mb"]
            print(f"| {fmt} | {r['model_mb']:.0f} | {extra:.0f} MB | {fwd:.0f} MB | {ratio:.2f}x |")
    finally:
        if a.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
