"""Meta's own checkpoints: ``params.json`` + ``consolidated.NN.pth`` (one per model-parallel rank).

Loaded with ``torch.load(weights_only=True, mmap=True)``: a pickle that tries to run code is
refused, never executed. Model-parallel shards are merged along the dimension each of
Meta's fairscale layers splits (llama/model.py in meta-llama/llama3):

- ``VocabParallelEmbedding`` (tok_embeddings): split along the vocabulary, dim 0;
- ``ColumnParallelLinear`` (wq, wk, wv, w1, w3, output): split along the output features, dim 0;
- ``RowParallelLinear`` (wo, w2): split along the input features, dim 1;
- norms: replicated on every rank.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from ..config import PRESETS, ModelArgs
from .common import (MAX_CONTEXT, Checkpoint, CheckpointError, ReadOptions, check_layers, check_shapes, file_ranges,
                     finish_tensor, need_bool, need_float, need_int, populate_pages, read_json_object, release_pages,
                     shares_memory, show)

_SPLIT_DIM = {"tok_embeddings": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}

# params.json key -> how its value is checked (a ModelArgs field of the same name, but rope_scaling_factor).
PARAMS_KEYS = {"dim": need_int, "n_layers": need_int, "n_heads": need_int, "n_kv_heads": need_int,
               "vocab_size": need_int, "multiple_of": need_int, "ffn_dim_multiplier": need_float,
               "norm_eps": need_float, "rope_theta": need_float, "use_scaled_rope": need_bool,
               "max_batch_size": need_int, "max_seq_len": need_int, "rope_scaling_factor": need_float}
_ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier")


def split_dim(name: str) -> int | None:
    """The dimension along which Meta's model-parallel ranks split this tensor (None: replicated)."""
    module = name.split(".")[-2]
    return _SPLIT_DIM.get(module)


def _rope_factor(folder: Path, params: dict) -> float:
    """Llama 3.1 uses factor 8; 3.2 1B/3B use 32 but their params.json does not say so.

    Order: an explicit ``rope_scaling_factor`` in params.json; the parent folder's HF
    config.json (an ``original/`` subfolder of an HF download); the published preset whose
    architecture these params match; else 8, Meta's reference value.
    """
    if "rope_scaling_factor" in params:
        return params["rope_scaling_factor"]
    hf_config = folder.parent / "config.json"
    if folder.name == "original" and hf_config.is_file():
        rope = read_json_object(hf_config).get("rope_scaling") or {}
        if isinstance(rope, dict) and "factor" in rope:
            return need_float(hf_config, "rope_scaling.factor", rope["factor"])
    for preset in PRESETS.values():
        if preset.get("use_scaled_rope") and all(params.get(k) == preset.get(k) for k in _ARCH_FIELDS):
            return float(preset["rope_scale_factor"])
    return 8.0


def args_from_params(folder: Path, params: dict, **overrides) -> ModelArgs:
    """ModelArgs from Meta's ``params.json``: known keys only, each of its JSON type and in range."""
    path = folder / "params.json"
    if not isinstance(params, dict):
        raise CheckpointError(path, "params.json is not a JSON object")
    unknown = set(params) - set(PARAMS_KEYS)
    if unknown:
        raise CheckpointError(path, f"unknown keys {sorted(unknown)}: not a Llama 3 text model's params")
    fields = {}
    for key, value in params.items():
        if value is None and key in ("n_kv_heads", "ffn_dim_multiplier"):
            continue  # None: as many KV heads as heads; Meta's FFN rule without a multiplier
        bounds = {"high": MAX_CONTEXT} if key == "max_seq_len" else {}
        fields[key] = PARAMS_KEYS[key](path, key, value, **bounds)
    scaled = fields.get("use_scaled_rope", False)
    fields.setdefault("max_seq_len", 131072 if scaled else 8192)
    factor = fields.pop("rope_scaling_factor", None)
    if scaled:
        fields["rope_scale_factor"] = factor if factor is not None else _rope_factor(folder, params)
    fields["source"] = str(path)
    fields.update(overrides)
    try:
        return ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"invalid params: {e}") from None


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """One ``consolidated.NN.pth``, memory-mapped, with every tensor checked to lie within its own
    storage without overlapping itself: an expanded (stride-0) view of a few bytes could otherwise
    stand for gigabytes once merged or converted."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"refused: the pickle is not plain tensors (it may try to run code): {first}") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"cannot read checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(path, "is not a state dict of named tensors")
    total, seen = 0, set()
    for name, t in state.items():
        check_extent(path, name, t)
        region = (t.data_ptr(), t.numel() * t.element_size())
        if region not in seen:  # a tied copy that is the same view is counted once
            seen.add(region)
            total += region[1]
    size = os.path.getsize(path)
    if total > size:
        raise CheckpointError(path, f"its tensors span {total} bytes but the file holds {size}: views that share "
                                    "storage are not a checkpoint")
    return state


def check_extent(path, name: str, t: torch.Tensor) -> None:
    """Refuse a tensor that overlaps itself (a stride smaller than what the smaller strides span,
    e.g. 0 in an expanded view) or reaches past the end of its storage."""
    span = 1  # elements spanned by the dimensions taken so far, smallest stride first
    for stride, n in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride < span:
            raise CheckpointError(path, f"tensor {show(name)} is an overlapping or expanded view "
                                        f"(shape {tuple(t.shape)}, strides {t.stride()}): refused")
        span += stride * (n - 1)
    if t.numel() and (t.storage_offset() + span) * t.element_size() > t.untyped_storage().nbytes():
        raise CheckpointError(path, f"tensor {show(name)} reaches past the end of its storage: refused")


def merged_shapes(shards: list[dict[str, torch.Tensor]], paths: list[Path]) -> dict[str, tuple[int, ...]]:
    """The shape each tensor will have once Meta's model-parallel shards are merged, computed from
    the shards' shapes alone (nothing is concatenated before the shapes are known to be right)."""
    names = set(shards[0])
    for shard, path in zip(shards[1:], paths[1:]):
        if set(shard) != names:
            raise CheckpointError(path, f"holds different tensors than {paths[0].name}")
    merged = {}
    for name in shards[0]:
        shapes = [tuple(s[name].shape) for s in shards]
        dim = split_dim(name)
        if dim is None or len(shards) == 1:
            if len(set(shapes)) != 1:
                raise CheckpointError(paths[0].parent, f"{name} is replicated but differs between shards: {shapes}")
            merged[name] = shapes[0]
            continue
        rest = {s[:dim] + s[dim + 1:] for s in shapes if len(s) > dim}
        if len(rest) != 1 or any(len(s) <= dim for s in shapes):
            raise CheckpointError(paths[0].parent, f"cannot merge shards of {name}: shapes {shapes} differ "
                                                   f"outside dimension {dim}")
        merged[name] = shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1:]
    return merged


def load_meta(folder, opts: ReadOptions = ReadOptions(), progress=None) -> Checkpoint:
    """A ``Checkpoint`` of a Meta folder: one shard's tensors read in place where the layout allows;
    several shards are shape-checked, then merged one tensor at a time."""
    folder = Path(folder)
    args = args_from_params(folder, read_json_object(folder / "params.json"))
    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(folder, "no consolidated.*.pth files")
    shards = [read_shard(p) for p in paths]
    shapes = merged_shapes(shards, paths)
    shapes.pop("rope.freqs", None)  # Llama 2 checkpoints stored the RoPE table; we recompute it
    if "output.weight" not in shapes and not args.tie_word_embeddings:
        args = args.replace(tie_word_embeddings=True)
    check_layers(folder / "params.json", "n_layers", args.n_layers, shapes)
    check_shapes(folder, args, shapes)

    state, dequantized, in_place = {}, [], set()
    mapped = [file_ranges(p) for p in paths]  # where torch.load mapped each shard file
    for name in shapes:
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        parts = [s[name] for s in shards]
        dim = split_dim(name) if len(parts) > 1 else None
        nbytes = [p.numel() * p.element_size() for p in parts]
        # The end of the file mapping each part lies in (None: not in one; then its pages are left alone).
        ends = [next((end for start, end in ranges if start <= p.data_ptr() and p.data_ptr() + n <= end), None)
                for p, n, ranges in zip(parts, nbytes, mapped)]
        for part, n, end in list(zip(parts, nbytes, ends))[:None if dim is not None else 1]:
            if end is not None:
                populate_pages(part.data_ptr(), n, end)
        t = parts[0] if dim is None else torch.cat(parts, dim=dim)
        value = state[name] = finish_tensor(folder, name, t, opts, dequantized)
        if dim is None and shares_memory(value, t.data_ptr(), nbytes[0]):
            in_place.add(name)
        else:  # converted: the shards' pages behind it leave the resident set
            for part, n, end in zip(parts, nbytes, ends):
                if end is not None:
                    release_pages(part.data_ptr(), n)
        if progress is not None:
            progress(sum(nbytes))
    return Checkpoint(folder, "meta", args, state, dequantized=dequantized, in_place=frozenset(in_place))
