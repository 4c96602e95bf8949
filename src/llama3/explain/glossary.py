"""``llama3 explain``: every ModelArgs field with its meaning, and the numbers that follow from them."""

from __future__ import annotations

import dataclasses
import math
import os

from ..config import PRESETS, ModelArgs, meta_ffn_hidden_dim

GLOSSARY = {
    "dim": "width of the residual stream: every token is a vector of this many numbers",
    "n_layers": "number of transformer blocks (attention + feed-forward) stacked",
    "n_heads": "query heads per attention layer; each attends with head_dim = dim / n_heads numbers",
    "n_kv_heads": "key/value heads (grouped-query attention); several query heads share one (None = n_heads)",
    "vocab_size": "number of tokens the embedding and the output projection know",
    "multiple_of": "the FFN width is rounded up to a multiple of this (hardware-friendly sizes)",
    "ffn_dim_multiplier": "scales the FFN width before rounding (None = 1)",
    "norm_eps": "added inside RMSNorm's square root so it never divides by zero",
    "rope_theta": "RoPE base: band i rotates with frequency theta^(-2i/head_dim); larger = longer wavelengths",
    "max_batch_size": "most sequences a KV cache is sized for by default",
    "max_seq_len": "context length: most positions the model is run at",
    "use_scaled_rope": "Llama 3.1 RoPE scaling: slow down long-wavelength bands to reach a longer context",
    "rope_scale_factor": "how much the longest wavelengths are stretched (8 for 3.1, 32 for 3.2 1B/3B)",
    "rope_low_freq_factor": "bands with wavelength > original_context / this are fully scaled",
    "rope_high_freq_factor": "bands with wavelength < original_context / this are left alone",
    "rope_original_max_seq_len": "the context the model was first trained at, before scaling",
    "tie_word_embeddings": "the output projection reuses the embedding matrix (Llama 3.2 1B/3B, SmolLM2)",
    "ffn_hidden_dim": "FFN width stated by the checkpoint (None = derived by Meta's rule)",
    "rope_freq_divisors": "per-band RoPE divisors given by the checkpoint (a GGUF's rope_freqs tensor)",
    "source": "where these numbers came from",
}

BYTES = {"float32": 4, "bfloat16": 2, "int8": 1, "4-bit": 0.5}


def _ffn_steps(a: ModelArgs) -> dict:
    if a.ffn_hidden_dim is not None:
        return {"value": a.hidden_dim, "arithmetic": f"stated by the checkpoint: {a.ffn_hidden_dim}"}
    h0 = 4 * a.dim
    h1 = int(2 * h0 / 3)
    text = f"4*dim = {h0}; int(2/3 of it) = {h1}"
    h2 = h1
    if a.ffn_dim_multiplier is not None:
        h2 = int(a.ffn_dim_multiplier * h1)
        text += f"; x ffn_dim_multiplier {a.ffn_dim_multiplier} = {h2}"
    h3 = meta_ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier)
    text += f"; rounded up to a multiple of {a.multiple_of} = {h3}"
    return {"value": h3, "arithmetic": text}


def _rope(a: ModelArgs) -> dict:
    from ..model import rope_frequencies

    plain = rope_frequencies(a.replace(use_scaled_rope=False, rope_freq_divisors=None))
    used = rope_frequencies(a)
    wl = [2 * math.pi / float(f) for f in plain]
    out = {"bands": len(wl), "shortest_wavelength_tokens": round(min(wl), 2),
           "longest_wavelength_tokens": round(max(wl), 1)}
    divisors = [float(p / u) for p, u in zip(plain, used)]
    if a.use_scaled_rope or a.rope_freq_divisors is not None:
        unchanged = sum(1 for d in divisors if abs(d - 1) < 1e-6)
        full = max(divisors)
        fully = sum(1 for d in divisors if abs(d - full) < 1e-4 * full)
        out.update(scaled=True, bands_unchanged=unchanged, bands_fully_scaled=fully,
                   bands_blended=len(divisors) - unchanged - fully, max_divisor=round(full, 3),
                   longest_wavelength_after_scaling_tokens=round(max(wl) * full, 1))
        if a.rope_freq_divisors is None:
            orig = a.rope_original_max_seq_len
            out["rule"] = (f"wavelength > {orig}/{a.rope_low_freq_factor:g} = {orig / a.rope_low_freq_factor:g} "
                           f"tokens: frequency / {a.rope_scale_factor:g}; < {orig}/{a.rope_high_freq_factor:g} = "
                           f"{orig / a.rope_high_freq_factor:g}: unchanged; in between: blended")
        else:
            out["rule"] = "per-band divisors given by the checkpoint (rope_freqs)"
    else:
        out["scaled"] = False
    return out


def explain(args: ModelArgs, *, tensor_counts: dict[str, int] | None = None, batch: int | None = None,
            context: int | None = None, bandwidth_gbs: float = 20.0) -> dict:
    """Everything ``llama3 explain`` shows, as a JSON-ready dict."""
    a = args
    batch = batch or a.max_batch_size
    context = context or a.max_seq_len
    counts = a.param_counts()
    total = a.num_params()
    kv_per_token = {k: a.kv_cache_bytes_per_token(2 if k == "bfloat16" else 4) for k in ("float32", "bfloat16")}
    # Bytes read per decoded token: every matrix once, except the embedding table (one row) unless
    # it doubles as the output projection.
    read_params = total - (0 if a.tie_word_embeddings else counts["embeddings"])
    matmul_params = total - counts["embeddings"] + (counts["embeddings"] if a.tie_word_embeddings else 0) \
        - counts["norms"]
    out = {
        "fields": {f.name: {"value": getattr(a, f.name), "meaning": GLOSSARY.get(f.name, "")}
                   for f in dataclasses.fields(a)},
        "derived": {
            "head_dim": {"value": a.head_dim, "arithmetic": f"dim / n_heads = {a.dim} / {a.n_heads}"},
            "kv_heads": {"value": a.kv_heads, "arithmetic": "n_kv_heads" if a.n_kv_heads else "n_heads (no GQA)"},
            "queries_per_kv_head": {"value": a.n_rep, "arithmetic": f"n_heads / n_kv_heads = {a.n_heads} / {a.kv_heads}"},
            "ffn_hidden_dim": _ffn_steps(a),
            "rope": _rope(a),
        },
        "parameters": dict(counts, total=total, tied=a.tie_word_embeddings),
        "memory": {
            "weights_bytes": {k: int(total * b) for k, b in BYTES.items()},
            "kv_cache_bytes_per_token": kv_per_token,
            "kv_cache": {"batch": batch, "context": context,
                         "bytes": {k: v * batch * context for k, v in kv_per_token.items()}},
        },
        "compute": {
            "flops_per_token": 2 * matmul_params,
            "attention_flops_per_token_at_context": 4 * a.n_layers * context * a.n_heads * a.head_dim,
            "arithmetic": "2 x matrix parameters (one multiply-add each); attention adds 4 x n_layers x "
                          "context x dim (QK^T and AV)",
        },
        "decode_speed_limit": {
            "bandwidth_gb_per_s": bandwidth_gbs,
            "bytes_read_per_token": {k: int(read_params * b) for k, b in BYTES.items()},
            "tokens_per_s": {k: round(bandwidth_gbs * 1e9 / (read_params * b), 1) for k, b in BYTES.items()},
            "arithmetic": "batch-1 decode reads every weight once per token: bandwidth / weight bytes",
        },
    }
    if tensor_counts is not None:
        out["parameters"]["from_checkpoint_tensors"] = tensor_counts
    return out


def checkpoint_param_counts(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Parameters per component from a Meta-named {name: shape} table (a tied output counted once)."""
    groups = {"embeddings": 0, "attention": 0, "feed_forward": 0, "norms": 0, "output": 0}
    for name, shape in shapes.items():
        n = math.prod(shape)
        if name.startswith("tok_embeddings"):
            groups["embeddings"] += n
        elif ".attention." in name:
            groups["attention"] += n
        elif ".feed_forward." in name:
            groups["feed_forward"] += n
        elif name.endswith("norm.weight"):
            groups["norms"] += n
        elif name.startswith("output"):
            groups["output"] += n
    groups["total"] = sum(groups.values())
    return groups


def resolve(target: str | None):
    """(ModelArgs, {name: shape} or None, label) for a preset name, a checkpoint path, or None (default model)."""
    if target is not None and target.lower() in PRESETS:
        return ModelArgs.from_preset(target), None, target.lower()
    from ..weights import default_model_path
    from ..weights.shapes import checkpoint_shapes

    path = default_model_path() if target is None else target
    if target is not None and not os.path.exists(os.path.expanduser(str(target))):
        import difflib

        near = difflib.get_close_matches(str(target).lower(), list(PRESETS), n=3, cutoff=0.6)
        raise ValueError(f"{target!r} is neither a checkpoint path nor a preset"
                         + (f" (did you mean {' or '.join(near)}?)" if near else "")
                         + f"; presets: {', '.join(PRESETS)}")
    args, shapes = checkpoint_shapes(path)
    return args, shapes, str(path)


def execution_path(target) -> str:
    """How ``llama3.load`` runs this checkpoint by default on this machine: the engine's own policy, asked
    of the loaded model (weights are memory-mapped, so this reads little of a large file)."""
    from ..loading import load

    return load(target, quiet=True).describe() + "; --quantize none for the exact float path"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def format_text(info: dict, label: str) -> str:
    lines = [f"{label}"] + ([f"runs as: {info['execution']}"] if "execution" in info else []) + \
        ["", "config (a live glossary)"]
    for name, f in info["fields"].items():
        value = f["value"]
        if name == "rope_freq_divisors" and value is not None:
            value = f"[{len(value)} values, {min(value):.3g}..{max(value):.3g}]"
        lines.append(f"  {name:<26} {str(value):<14} {f['meaning']}")
    d = info["derived"]
    lines += ["", "derived"]
    for key in ("head_dim", "kv_heads", "queries_per_kv_head", "ffn_hidden_dim"):
        lines.append(f"  {key:<26} {d[key]['value']:<14} {d[key]['arithmetic']}")
    r = d["rope"]
    lines.append(f"  {'rope wavelengths':<26} {r['shortest_wavelength_tokens']} .. {r['longest_wavelength_tokens']} "
                 f"tokens over {r['bands']} bands")
    if r.get("scaled"):
        lines.append(f"  {'rope scaling':<26} {r['bands_unchanged']} bands unchanged, {r['bands_blended']} blended, "
                     f"{r['bands_fully_scaled']} divided by {r['max_divisor']} (longest wavelength -> "
                     f"{r['longest_wavelength_after_scaling_tokens']} tokens)")
        lines.append(f"  {'':<26} {r['rule']}")
    p = info["parameters"]
    lines += ["", "parameters" + (" (output tied to the embeddings)" if p["tied"] else "")]
    for key in ("embeddings", "attention", "feed_forward", "norms", "output", "total"):
        share = p[key] / p["total"] * 100 if p["total"] else 0
        lines.append(f"  {key:<26} {p[key]:>16,}  {share:5.1f}%")
    if "from_checkpoint_tensors" in p:
        lines.append(f"  {'checkpoint tensors total':<26} {p['from_checkpoint_tensors']['total']:>16,}")
    m = info["memory"]
    lines += ["", "memory"]
    lines.append("  weights: " + ", ".join(f"{k} {_human_bytes(v)}" for k, v in m["weights_bytes"].items()))
    lines.append("  KV cache per token: " + ", ".join(f"{k} {_human_bytes(v)}"
                                                      for k, v in m["kv_cache_bytes_per_token"].items()))
    kv = m["kv_cache"]
    lines.append(f"  KV cache for batch {kv['batch']} x context {kv['context']}: " +
                 ", ".join(f"{k} {_human_bytes(v)}" for k, v in kv["bytes"].items()))
    c = info["compute"]
    lines += ["", "compute", f"  {c['flops_per_token'] / 1e9:.3f} GFLOP per token ({c['arithmetic']}); attention "
                             f"adds {c['attention_flops_per_token_at_context'] / 1e9:.3f} GFLOP at full context"]
    s = info["decode_speed_limit"]
    lines += ["", f"batch-1 decode speed limit at {s['bandwidth_gb_per_s']} GB/s ({s['arithmetic']})"]
    lines.append("  " + ", ".join(f"{k} {v} tok/s" for k, v in s["tokens_per_s"].items()))
    return "\n".join(lines)


def format_compare(a: dict, b: dict, label_a: str, label_b: str) -> str:
    rows = [("dim", lambda i: i["fields"]["dim"]["value"]), ("n_layers", lambda i: i["fields"]["n_layers"]["value"]),
            ("n_heads", lambda i: i["fields"]["n_heads"]["value"]), ("kv_heads", lambda i: i["derived"]["kv_heads"]["value"]),
            ("head_dim", lambda i: i["derived"]["head_dim"]["value"]),
            ("ffn_hidden_dim", lambda i: i["derived"]["ffn_hidden_dim"]["value"]),
            ("vocab_size", lambda i: i["fields"]["vocab_size"]["value"]),
            ("rope_theta", lambda i: i["fields"]["rope_theta"]["value"]),
            ("scaled rope", lambda i: i["derived"]["rope"].get("scaled")),
            ("tied output", lambda i: i["parameters"]["tied"]),
            ("parameters", lambda i: f"{i['parameters']['total']:,}"),
            ("bf16 weights", lambda i: _human_bytes(i["memory"]["weights_bytes"]["bfloat16"])),
            ("KV/token (bf16)", lambda i: _human_bytes(i["memory"]["kv_cache_bytes_per_token"]["bfloat16"])),
            ("GFLOP/token", lambda i: f"{i['compute']['flops_per_token'] / 1e9:.2f}"),
            ("bf16 decode limit", lambda i: f"{i['decode_speed_limit']['tokens_per_s']['bfloat16']} tok/s")]
    width = max(len(label_a), len(label_b), 16)
    lines = [f"{'':<20}{label_a:>{width}}  {label_b:>{width}}"]
    for name, get in rows:
        lines.append(f"{name:<20}{str(get(a)):>{width}}  {str(get(b)):>{width}}")
    return "\n".join(lines)
