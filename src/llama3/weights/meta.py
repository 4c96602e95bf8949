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

import json
import pickle
from pathlib import Path

import torch

from ..config import PRESETS, ModelArgs
from .common import CheckpointError, check_state_dict

_SPLIT_DIM = {"tok_embeddings": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}

PARAMS_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "max_batch_size", "max_seq_len",
               "rope_scaling_factor"}
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
        return float(params["rope_scaling_factor"])
    hf_config = folder.parent / "config.json"
    if folder.name == "original" and hf_config.is_file():
        try:
            rope = json.loads(hf_config.read_text()).get("rope_scaling") or {}
            if "factor" in rope:
                return float(rope["factor"])
        except (OSError, ValueError, AttributeError):
            pass
    for preset in PRESETS.values():
        if preset.get("use_scaled_rope") and all(params.get(k) == preset.get(k) for k in _ARCH_FIELDS):
            return float(preset["rope_scale_factor"])
    return 8.0


def args_from_params(folder: Path, params: dict, **overrides) -> ModelArgs:
    path = folder / "params.json"
    if not isinstance(params, dict):
        raise CheckpointError(path, "params.json is not a JSON object")
    unknown = set(params) - PARAMS_KEYS
    if unknown:
        raise CheckpointError(path, f"unknown keys {sorted(unknown)}: not a Llama 3 text model's params")
    fields = {k: v for k, v in params.items() if k in PARAMS_KEYS and k != "rope_scaling_factor"}
    scaled = bool(fields.get("use_scaled_rope", False))
    fields.setdefault("max_seq_len", 131072 if scaled else 8192)
    if scaled:
        fields["rope_scale_factor"] = _rope_factor(folder, params)
    fields["source"] = str(path)
    fields.update(overrides)
    try:
        return ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"invalid params: {e}") from None


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"refused: the pickle is not plain tensors (it may try to run code): {first}") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"cannot read checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "is not a state dict of tensors")
    return state


def merge_shards(shards: list[dict[str, torch.Tensor]], paths: list[Path]) -> dict[str, torch.Tensor]:
    """One state dict from Meta's model-parallel shards."""
    if len(shards) == 1:
        return dict(shards[0])
    names = list(shards[0])
    for shard, path in zip(shards[1:], paths[1:]):
        if set(shard) != set(names):
            raise CheckpointError(path, f"holds different tensors than {paths[0].name}")
    merged = {}
    for name in names:
        parts = [s[name] for s in shards]
        dim = split_dim(name)
        if dim is None:
            merged[name] = parts[0]
            continue
        try:
            merged[name] = torch.cat(parts, dim=dim)
        except RuntimeError as e:
            raise CheckpointError(paths[0].parent, f"cannot merge shards of {name}: {e}") from None
    return merged


def load_meta(folder, dtype: torch.dtype = torch.float32, progress=None) -> tuple[ModelArgs, dict]:
    folder = Path(folder)
    try:
        params = json.loads((folder / "params.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(folder / "params.json", f"cannot read params: {e}") from None
    args = args_from_params(folder, params)
    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(folder, "no consolidated.*.pth files")
    shards = [read_shard(p) for p in paths]
    merged = merge_shards(shards, paths)
    merged.pop("rope.freqs", None)  # Llama 2 checkpoints stored the RoPE table; we recompute it
    if "output.weight" not in merged and not args.tie_word_embeddings:
        args = args.replace(tie_word_embeddings=True)
    check_state_dict(folder, args, merged)
    state = {}
    for name, tensor in merged.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        state[name] = tensor.to(dtype)  # no copy when the dtype matches: stays memory-mapped
        if progress is not None:
            progress(tensor.numel() * tensor.element_size())
    return args, state
