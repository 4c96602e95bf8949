"""Hugging Face checkpoints: ``config.json`` + ``*.safetensors``.

Hugging Face's Llama rotates the two *halves* of each head (``rotate_half``) where Meta
rotates adjacent *pairs*; its converter (convert_llama_weights_to_hf.py) therefore stores
wq and wk with the rows of each head permuted. ``hf_to_meta_qk`` undoes that permutation.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelArgs
from .common import (MAX_CONTEXT, Checkpoint, CheckpointError, FileMap, ReadOptions, check_layers, check_shapes,
                     finish_tensor, need_bool, need_float, need_int, need_str, read_json_object, show)


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
    """ModelArgs from an HF ``config.json`` (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``).

    Every value we read is checked for its JSON type: integers are integers, booleans are booleans
    (``"tie_word_embeddings": "false"`` is refused, not read as true), numbers are finite."""
    def get(key, check, default=None, **bounds):
        if key not in config or config[key] is None:
            if default is None:
                raise CheckpointError(path, f"config has no {key!r}")
            return default
        return check(path, key, config[key], **bounds)

    model_type = get("model_type", need_str, "llama")
    if model_type != "llama":
        raise CheckpointError(path, f"model_type {show(model_type)} is not a Llama architecture")
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag, need_bool, False):
            raise CheckpointError(path, f"{flag}=true is not part of the Llama architecture")
    act = get("hidden_act", need_str, "silu")
    if act != "silu":
        raise CheckpointError(path, f"hidden_act {show(act)} is not supported (Llama uses silu)")
    dim, n_heads = get("hidden_size", need_int), get("num_attention_heads", need_int)
    head_dim = get("head_dim", need_int, dim // n_heads)
    if head_dim * n_heads != dim:
        raise CheckpointError(path, f"head_dim {head_dim} * num_attention_heads {n_heads} != hidden_size {dim}")

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(path, f"rope_scaling must be an object, got {show(rope)}")
    theta = config["rope_theta"] if config.get("rope_theta") is not None else rope.get("rope_theta", 10000.0)
    rope_type = need_str(path, "rope_type", rope.get("rope_type", rope.get("type", "default")))
    fields = dict(
        dim=dim, n_layers=get("num_hidden_layers", need_int), n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", need_int, n_heads), vocab_size=get("vocab_size", need_int),
        ffn_hidden_dim=get("intermediate_size", need_int), norm_eps=get("rms_norm_eps", need_float, 1e-6),
        rope_theta=need_float(path, "rope_theta", theta),
        max_seq_len=get("max_position_embeddings", need_int, 2048, high=MAX_CONTEXT),
        tie_word_embeddings=get("tie_word_embeddings", need_bool, False), source=str(path),
    )
    if rope_type == "llama3":
        def rope_value(key, check, **bounds):
            if key not in rope:
                raise CheckpointError(path, f"rope_scaling has no {key!r}")
            return check(path, f"rope_scaling.{key}", rope[key], **bounds)

        fields.update(use_scaled_rope=True, rope_scale_factor=rope_value("factor", need_float),
                      rope_low_freq_factor=rope_value("low_freq_factor", need_float),
                      rope_high_freq_factor=rope_value("high_freq_factor", need_float),
                      rope_original_max_seq_len=rope_value("original_max_position_embeddings", need_int,
                                                           high=MAX_CONTEXT))
    elif rope_type != "default":
        raise CheckpointError(path, f"rope type {show(rope_type)} is not supported (only 'llama3' scaling)")
    fields.update(overrides)
    try:
        return ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"invalid configuration: {e}") from None


# ------------------------------------------------------------------------------ safetensors
# safetensors dtype names -> bytes per element (the format's own list).
ST_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                  "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_ST_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_ST_HEADER = 100_000_000  # the safetensors library's own limit


@dataclass
class StEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute, in the file
    end: int


def read_safetensors_header(path) -> dict[str, StEntry]:
    """The tensors a safetensors file states, every field checked against the format and the file's
    size (duplicate names refused: the safetensors library keeps the last one, silently)."""
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(path, f"file is truncated: {size} bytes is too short for a safetensors header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(path, f"safetensors header length {n} is larger than the file ({size} bytes): "
                                        "truncated or corrupt")
        if n > MAX_ST_HEADER:
            raise CheckpointError(path, f"safetensors header length {n} is over the format's limit of {MAX_ST_HEADER}")
        text = f.read(n)

    def no_duplicates(pairs):
        out = dict(pairs)
        if len(out) != len(pairs):
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise CheckpointError(path, f"tensor or field {show(dup)} appears twice in the safetensors header")
        return out

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"invalid safetensors header: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "invalid safetensors header: not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise CheckpointError(path, "__metadata__ must map strings to strings")
            continue
        where = f"tensor {show(name)}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(path, f"{where}: an entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ST_DTYPE_SIZES:
            raise CheckpointError(path, f"{where}: unknown dtype {show(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(path, f"{where}: shape must be a list of non-negative integers, got {show(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(path, f"{where}: data_offsets {show(offsets)} are not within the file's "
                                        f"{data_size} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * ST_DTYPE_SIZES[dtype]:
            raise CheckpointError(path, f"{where}: shape {shape} of {dtype} does not fit data_offsets {offsets}")
        entries[name] = StEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    spans = sorted((e.begin, e.end, name) for name, e in entries.items() if e.end > e.begin)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(path, f"tensors {show(a)} and {show(b)} overlap in the file")
    return entries


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those named by model.safetensors.index.json, or all *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(index, "not a valid safetensors index: weight_map must map names to file names")
        files = []
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or name in (".", ".."):
                raise CheckpointError(index, f"shard name {show(name)} is not a plain file name in this folder")
            if not (folder / name).is_file():
                raise CheckpointError(index, f"shard {show(name)} named by the index does not exist")
            files.append(folder / name)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(folder, "no *.safetensors files")
    return files


def _view(path, fm: FileMap, name: str, e: StEntry) -> torch.Tensor:
    """A tensor's data as a view of the file's map (a copy only if the file misaligns it)."""
    if e.dtype not in _ST_TORCH:
        raise CheckpointError(path, f"tensor {show(name)} has dtype {e.dtype}; weights must be F32, F16 or BF16")
    raw = torch.from_numpy(fm.bytes[e.begin:e.end])
    if e.begin % ST_DTYPE_SIZES[e.dtype]:
        raw = raw.clone()
    return raw.view(_ST_TORCH[e.dtype]).view(e.shape)


def index_hf_folder(folder: Path) -> tuple[ModelArgs, list[Path], dict[str, tuple[Path, str, StEntry]]]:
    """(args, the safetensors files, Meta name -> (file, HF key, header entry)): names, shapes and
    offsets only (no tensor data read), checked against config.json."""
    config_path = folder / "config.json"
    args = args_from_hf_config(read_json_object(config_path), config_path)
    files = safetensors_files(folder)
    where: dict[str, tuple[Path, str, StEntry]] = {}
    for file in files:
        for key, entry in read_safetensors_header(file).items():
            meta = meta_name(key)
            if meta is None:
                if "rotary_emb" in key:
                    continue
                raise CheckpointError(file, f"unexpected tensor {show(key)} for a Llama model")
            if meta in where:
                raise CheckpointError(file, f"tensor {key!r} appears in two files")
            where[meta] = (file, key, entry)
    check_layers(config_path, "num_hidden_layers", args.n_layers, where)
    check_shapes(folder, args, {meta: e.shape for meta, (_, _, e) in where.items()})
    return args, files, where


def load_hf(folder, opts: ReadOptions = ReadOptions(), progress=None) -> Checkpoint:
    """A ``Checkpoint`` of an HF folder (config.json + safetensors), tensors read in place where the
    layout allows (wq/wk need the HF->Meta row permutation: one tensor's copy at a time)."""
    folder = Path(folder)
    args, files, where = index_hf_folder(folder)

    state, dequantized, in_place = {}, [], set()
    for file in files:
        fm = FileMap(file)
        for meta, (src, key, e) in where.items():
            if src != file or (meta == "output.weight" and args.tie_word_embeddings):
                continue
            fm.populate(e.begin, e.end - e.begin)
            t = convert_tensor(meta, _view(file, fm, key, e), args)
            value = state[meta] = finish_tensor(file, meta, t, opts, dequantized)
            if fm.holds(value, e.begin, e.end - e.begin):
                in_place.add(meta)
            else:
                fm.release(e.begin, e.end - e.begin)
            if progress is not None:
                progress(e.end - e.begin)
    return Checkpoint(folder, "hf", args, state, dequantized=dequantized, in_place=frozenset(in_place))
