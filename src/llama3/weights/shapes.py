"""Config and tensor shapes of a checkpoint, without reading (or dequantizing) its weights."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelArgs
from . import detect_format
from .common import CheckpointError


def checkpoint_shapes(path) -> tuple[ModelArgs, dict[str, tuple[int, ...]]]:
    """(args, {Meta name: shape}) for any supported checkpoint."""
    fmt, target = detect_format(path)
    if fmt == "gguf":
        from .gguf import args_from_metadata, check_header, meta_name

        header = check_header(str(target))
        args = args_from_metadata(str(target), header)
        return args, {meta_name(n): i.shape for n, i in header.tensors.items() if meta_name(n)}
    if fmt == "hf":
        from safetensors import safe_open

        from .hf import args_from_hf_config, check_safetensors_header, meta_name, safetensors_files

        try:
            config = json.loads((target / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(target / "config.json", f"cannot read config: {e}") from None
        args = args_from_hf_config(config, target / "config.json")
        shapes = {}
        for file in safetensors_files(target):
            check_safetensors_header(file)
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if meta_name(key):
                        shapes[meta_name(key)] = tuple(f.get_slice(key).get_shape())
        return args, shapes
    from .meta import args_from_params, merge_shards, read_shard

    params = json.loads((Path(target) / "params.json").read_text())
    args = args_from_params(Path(target), params)
    paths = sorted(Path(target).glob("consolidated.*.pth"))
    merged = merge_shards([read_shard(p) for p in paths], paths)
    merged.pop("rope.freqs", None)
    if "output.weight" not in merged:
        args = args.replace(tie_word_embeddings=True)
    return args, {k: tuple(v.shape) for k, v in merged.items()}
