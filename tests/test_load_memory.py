"""Peak memory while loading a model of ~100M parameters (216 MB in 16 bits, 432 MB widened to float32,
115 MB in Q8_0), large enough for the bounds to tell the cases apart. Each case loads in a fresh
process, which resets its peak RSS (VmHWM, file-backed pages included) after its imports and reports
its growth while reading the checkpoint, building the model and running one forward pass that
touches every weight.

The bound: the bytes the model holds once loaded (a matrix kept in its file's kind at the file's
size, anything widened at 4 bytes per value), times 1.1, plus the largest single transient the path
allows (quantizing while reading widens one matrix at a time), plus 48 MB for activations, the
allocator and the loader's bookkeeping. A whole-model float32 copy of a 16-bit or quantized file at
any moment would break it by 100 MB or more. And every matrix whose kind the kernels run is asserted
to be held in that kind, with exactly the file's bytes (never a float32 copy).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llama3 import ModelArgs
from llama3.kernels import SUPPORTED_KINDS

ARGS = ModelArgs(dim=1024, n_layers=6, n_heads=16, n_kv_heads=4, vocab_size=8192, ffn_hidden_dim=4096,
                 max_seq_len=2048, rope_theta=500000.0)
MB = 1 << 20

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from llama3 import kernels
from llama3.loading import build_model
from llama3.quantize import QuantTensor
from llama3.weights import load_checkpoint
from llama3.weights.common import tensors_of

def mb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024

kernels.library()
path, keep, quantize = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from here
base = mb("VmHWM")
ckpt = load_checkpoint(path, quiet=True, keep=keep, quantize=quantize)
loaded = mb("VmHWM")
tensors = {name: [v.kind if isinstance(v, QuantTensor) else str(v.dtype),
                  sum(t.numel() * t.element_size() for t in tensors_of(v)), name in ckpt.in_place]
           for name, v in ckpt.state.items()}
dequantized = ckpt.dequantized
model = build_model(ckpt.args, ckpt.state)
del ckpt
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))  # every weight is read: mapped pages become resident
print(json.dumps({"load_mb": loaded - base, "peak_mb": mb("VmHWM") - base, "tensors": tensors,
                  "dequantized": dequantized}))
"""


def write_files(root, args: ModelArgs = ARGS) -> dict:
    """One random model as a Q8_0 GGUF, an F16 GGUF, an HF bf16 folder and a Meta bf16 folder in ``root``."""
    import gguf
    from safetensors.torch import save_file

    from llama3.weights.common import expected_shapes
    from llama3.weights.gguf import GGUF_TO_META
    from llama3.weights.hf import HF_TO_META, meta_to_hf_qk
    from test_loaders import gguf_metadata

    rng = np.random.default_rng(0)
    state = {name: torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * (1.0 if len(shape) == 1 else 0.02))
             .to(torch.bfloat16) for name, shape in expected_shapes(args).items()}
    to_gguf = {m.format(i=i): g.format(i=i) for g, m in GGUF_TO_META.items() for i in range(args.n_layers)}
    out = {}
    for kind in ("Q8_0", "F16"):
        path = out[kind] = root / f"model-{kind}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        for key, (value, vtype) in gguf_metadata(args).items():
            w.add_key_value(key, value, vtype)
        for name, t in state.items():
            arr = t.float().numpy()
            qt = gguf.GGMLQuantizationType[kind if t.dim() == 2 else "F32"]
            data = arr if t.dim() == 1 else gguf.quants.quantize(arr, qt) if kind == "Q8_0" else arr.astype(np.float16)
            w.add_tensor(to_gguf[name], data, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    hf = out["hf"] = root / "hf"
    hf.mkdir()
    to_hf = {m.format(i=i): h.format(i=i) for h, m in HF_TO_META.items() for i in range(args.n_layers)}
    heads = {"wq": args.n_heads, "wk": args.kv_heads}
    save_file({to_hf[n]: (meta_to_hf_qk(t, heads[n.split(".")[-2]]) if n.split(".")[-2] in heads else t).contiguous()
               for n, t in state.items()}, hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": False}))
    meta = out["meta"] = root / "meta"
    meta.mkdir()
    torch.save(state, meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps({
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
        "vocab_size": args.vocab_size, "multiple_of": 1024, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5,
        "rope_theta": 500000.0}))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("load-memory"))


def from_gguf_is_a_view() -> bool:
    """Whether QuantTensor.from_gguf keeps the file's bytes as they are (a view) rather than copying them."""
    from llama3.quantize import QuantTensor
    from llama3.weights.common import shares_memory

    raw = np.zeros((1, 34), dtype=np.uint8)  # one Q8_0 block
    return shares_memory(QuantTensor.from_gguf(raw, "Q8_0", (1, 32)), raw.ctypes.data, raw.nbytes)


def load_in_child(path, keep=(), quantize=None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(sorted(keep)), json.dumps(quantize)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def resident_mb(report) -> float:
    return sum(n_bytes for _, n_bytes, _ in report["tensors"].values()) / MB


def matrices(report) -> dict:
    return {name: t for name, t in report["tensors"].items() if name.endswith(".weight") and "norm" not in name}


@pytest.mark.parametrize("fmt, kind", [("Q8_0", "Q8_0"), ("F16", "F16"), ("hf", "BF16"), ("meta", "BF16")])
def test_default_path_holds_the_files_kind(files, fmt, kind):
    """The default (auto) path: matrices of a kind the kernels run stay in it (the file's bytes, never a
    float32 copy); others are widened one tensor at a time and listed as dequantized."""
    report = load_in_child(files[fmt], keep=SUPPORTED_KINDS)
    mats = matrices(report)
    if kind in SUPPORTED_KINDS:
        assert all(k == kind for k, _, _ in mats.values()), mats
        assert report["dequantized"] == []
        if fmt in ("Q8_0", "F16") and from_gguf_is_a_view():  # read in place: views of the file's map
            assert all(in_place for _, _, in_place in mats.values()), mats
    else:
        assert all(k == "torch.float32" for k, _, _ in mats.values())
        assert sorted(name for name, _ in report["dequantized"]) == sorted(mats)
    bound = 1.1 * resident_mb(report) + 48
    print(f"{fmt}: holds {resident_mb(report):.0f} MB, peak RSS growth {report['load_mb']:.0f} MB loading, "
          f"{report['peak_mb']:.0f} MB after a forward pass (bound {bound:.0f} MB)")
    assert report["peak_mb"] < bound, report["peak_mb"]


@pytest.mark.parametrize("fmt", ["hf", "meta", "F16"])
def test_quantize_while_reading_never_holds_the_model_in_float32(files, fmt):
    """quantize="Q8_0" from 16-bit files: each matrix is widened alone, quantized and freed; the model
    in float32 (432 MB) never exists. Allowed transient: one matrix in float32 (the 32 MB output)."""
    report = load_in_child(files[fmt], quantize="q8_0")
    assert all(k == "Q8_0" for k, _, _ in matrices(report).values())
    largest = ARGS.vocab_size * ARGS.dim * 4 / MB
    bound = 1.1 * resident_mb(report) + largest + 48
    print(f"{fmt} -> Q8_0: holds {resident_mb(report):.0f} MB, peak RSS growth {report['peak_mb']:.0f} MB "
          f"(bound {bound:.0f} MB)")
    assert resident_mb(report) < 130 and report["peak_mb"] < bound, report["peak_mb"]


def test_float_path_widens_without_a_second_copy(files):
    """quantize=None (the exact float path) on a 16-bit file holds float32 (432 MB), and only that: the
    16-bit pages of each tensor are released once it is widened."""
    report = load_in_child(files["meta"])
    assert all(k == "torch.float32" for k, _, _ in report["tensors"].values())
    bound = 1.1 * resident_mb(report) + 48
    assert report["peak_mb"] < bound, (report["peak_mb"], bound)
