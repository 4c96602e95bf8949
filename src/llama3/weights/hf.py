"""Hugging Face checkpoints: ``config.json`` + ``*.safetensors``.

Hugging Face's Llama rotates the two *halves* of each head (``rotate_half``) where Meta
rotates adjacent *pairs*; its converter (convert_llama_weights_to_hf.py) therefore stores
wq and wk with the rows of each head permuted. ``hf_to_meta_qk`` undoes that permutation.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from ..config import ModelArgs
from .common import CheckpointError, check_state_dict


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute HF q_proj/k_proj rows back to Meta's RoPE layout.

    HF row order inside a head is (all even pair members, then all odd ones); Meta's is
    interleaved (x0, x1, x0, x1, ...). View as (heads, 2, head_dim/2, in), swap the middle axes.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``hf_to_meta_qk`` (Meta layout -> HF layout)."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


# HF name -> Meta name. "{i}" is the layer number.
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}
_LAYER = re.compile(r"\.(\d+)\.")


def meta_name(hf_name: str) -> str | None:
    """The Meta name of an HF tensor, or None if it is not part of the model (e.g. rotary caches)."""
    m = _LAYER.search(hf_name)
    if m:
        template = hf_name[: m.start()] + ".{i}." + hf_name[m.end():]
        target = HF_TO_META.get(template)
        return target.format(i=m.group(1)) if target else None
    return HF_TO_META.get(hf_name)


def convert_tensor(meta: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Apply the layout change a Meta-named tensor needs when it comes from HF."""
    if meta.endswith("attention.wq.weight"):
        return hf_to_meta_qk(tensor, args.n_heads)
    if meta.endswith("attention.wk.weight"):
        return hf_to_meta_qk(tensor, args.kv_heads)
    return tensor


def hf_state_dict_to_meta(state: dict[str, torch.Tensor], args: ModelArgs, path: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Rename an HF Llama state dict to Meta's names and permute q/k to Meta's RoPE layout."""
    out = {}
    for name, tensor in state.items():
        meta = meta_name(name)
        if meta is None:
            if "rotary_emb" in name:
                continue
            raise CheckpointError(path, f"unexpected tensor {name!r} for a Llama model")
        out[meta] = convert_tensor(meta, tensor, args)
    return out


def args_from_hf_config(config: dict, path: str = "config.json", **overrides) -> ModelArgs:
    """ModelArgs from an HF ``config.json`` (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
    def need(key):
        if key not in config:
            raise CheckpointError(path, f"config has no {key!r}")
        return config[key]

    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(path, f"model_type {model_type!r} is not a Llama architecture")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(path, f"{flag}=true is not part of the Llama architecture")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(path, f"hidden_act {config['hidden_act']!r} is not supported (Llama uses silu)")
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is not None and n_heads and head_dim * n_heads != dim:
        raise CheckpointError(path, f"head_dim {head_dim} * num_attention_heads {n_heads} != hidden_size {dim}")

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    fields = dict(
        dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=need("vocab_size"),
        ffn_hidden_dim=need("intermediate_size"), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta), max_seq_len=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), source=str(path),
    )
    if rope_type == "llama3":
        fields.update(use_scaled_rope=True, rope_scale_factor=float(rope["factor"]),
                      rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise CheckpointError(path, f"rope type {rope_type!r} is not supported (only 'llama3' scaling)")
    fields.update(overrides)
    try:
        return ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"invalid configuration: {e}") from None


def check_safetensors_header(path) -> None:
    """Refuse a safetensors file whose stated header is longer than the file itself."""
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(path, f"file is truncated: {size} bytes is too short for a safetensors header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise CheckpointError(path, f"safetensors header length {n} is larger than the file ({size} bytes): "
                                    "truncated or corrupt")


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those named by model.safetensors.index.json, or all *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(index, f"not a valid safetensors index: {e}") from None
        files = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                raise CheckpointError(index, f"shard name {name!r} is not a plain file name in this folder")
            if not (folder / name).is_file():
                raise CheckpointError(index, f"shard {name!r} named by the index does not exist")
            files.append(folder / name)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(folder, "no *.safetensors files")
    return files


def load_hf(folder, dtype: torch.dtype = torch.float32, progress=None) -> tuple[ModelArgs, dict]:
    """Args and a Meta-named state dict from an HF folder (config.json + safetensors)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(config_path, f"cannot read config: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(config_path, "config.json is not a JSON object")
    args = args_from_hf_config(config, config_path)
    files = safetensors_files(folder)

    # First pass: names and shapes only (no tensor data read), checked against the config.
    where: dict[str, tuple[Path, str]] = {}
    shapes = {}
    for file in files:
        check_safetensors_header(file)
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    meta = meta_name(key)
                    if meta is None:
                        if "rotary_emb" in key:
                            continue
                        raise CheckpointError(file, f"unexpected tensor {key!r} for a Llama model")
                    if meta in where:
                        raise CheckpointError(file, f"tensor {key!r} appears in two files")
                    where[meta] = (file, key)
                    shapes[meta] = torch.empty(f.get_slice(key).get_shape(), device="meta")
        except SafetensorError as e:
            raise CheckpointError(file, f"invalid safetensors file: {e}") from None
    check_state_dict(folder, args, shapes)

    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for meta, (src, key) in where.items():
                    if src != file:
                        continue
                    tensor = convert_tensor(meta, f.get_tensor(key), args)
                    state[meta] = tensor.to(dtype)
                    if progress is not None:
                        progress(tensor.numel() * tensor.element_size())
        except SafetensorError as e:
            raise CheckpointError(file, f"invalid safetensors file: {e}") from None
    if args.tie_word_embeddings:
        state.pop("output.weight", None)
    return args, state
