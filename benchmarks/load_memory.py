"""Peak memory while loading a 309M-parameter model (618 MB in 16 bits, 1.2 GB in float32, 330 MB in Q8_0)
from each format, on each loading path (random weights).

    .venv/bin/python benchmarks/load_memory.py [--dir /tmp/llama3-load]

Each load runs in a fresh process (tests/test_load_memory.py's child): it resets its peak RSS after
its imports, reads the checkpoint, builds the model and runs one forward pass that touches every
weight. "holds" is what the model keeps (a matrix in its file's kind at the file's size, anything
widened at 4 bytes per value); the ratio is the peak RSS growth over it. The default path keeps the
kinds ``llama3.kernels.SUPPORTED_KINDS`` runs; quantize=Q8_0 quantizes while reading.
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from llama3 import ModelArgs  # noqa: E402
from llama3.kernels import SUPPORTED_KINDS  # noqa: E402
from test_load_memory import load_in_child, resident_mb, write_files  # noqa: E402

ARGS = ModelArgs(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, vocab_size=32000, ffn_hidden_dim=4096,
                 max_seq_len=2048, rope_theta=500000.0)
CASES = [("Q8_0", "default", dict(keep=SUPPORTED_KINDS)), ("F16", "default", dict(keep=SUPPORTED_KINDS)),
         ("hf", "default", dict(keep=SUPPORTED_KINDS)), ("meta", "default", dict(keep=SUPPORTED_KINDS)),
         ("hf", "quantize=Q8_0", dict(quantize="Q8_0")), ("F16", "quantize=Q8_0", dict(quantize="Q8_0")),
         ("meta", "float (quantize=None)", {}), ("Q8_0", "float (quantize=None)", {})]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    a = p.parse_args()
    folder = Path(a.dir or tempfile.mkdtemp(prefix="llama3-load-"))
    try:
        files = write_files(folder, ARGS)
        print(f"model: {ARGS.num_params():,} parameters; kernels run {', '.join(sorted(SUPPORTED_KINDS))}\n")
        print("| file | path | holds | peak RSS growth loading | after a forward pass | ratio |\n|---|---|---|---|---|---|")
        for fmt, path, kwargs in CASES:
            r = load_in_child(files[fmt], **kwargs)
            held = resident_mb(r)
            print(f"| {fmt} | {path} | {held:.0f} MB | {r['load_mb']:.0f} MB | {r['peak_mb']:.0f} MB "
                  f"| {r['peak_mb'] / held:.2f}x |", flush=True)
    finally:
        if a.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
