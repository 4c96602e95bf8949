"""Config and tensor shapes of a checkpoint, without reading (or dequantizing) its weights."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelArgs
from . import detect_format
from .common import check_layers, read_json_object


def checkpoint_shapes(path) -> tuple[ModelArgs, dict[str, tuple[int, ...]]]:
    """(args, {Meta name: shape}) for any supported checkpoint, its config checked as loading checks it."""
    fmt, target = detect_format(path)
    if fmt == "gguf":
        from .gguf import args_from_metadata, check_header, meta_name

        header = check_header(str(target))
        args = args_from_metadata(str(target), header)
        return args, {meta_name(n): i.shape for n, i in header.tensors.items() if meta_name(n)}
    if fmt == "hf":
        from .hf import args_from_hf_config, meta_name, read_safetensors_header, safetensors_files

        args = args_from_hf_config(read_json_object(target / "config.json"), target / "config.json")
        shapes = {meta_name(key): e.shape for file in safetensors_files(target)
                  for key, e in read_safetensors_header(file).items() if meta_name(key)}
        check_layers(target / "config.json", "num_hidden_layers", args.n_layers, shapes)
        return args, shapes
    from .meta import args_from_params, merged_shapes, read_shard

    target = Path(target)
    args = args_from_params(target, read_json_object(target / "params.json"))
    paths = sorted(target.glob("consolidated.*.pth"))
    shapes = merged_shapes([read_shard(p) for p in paths], paths)
    shapes.pop("rope.freqs", None)
    if "output.weight" not in shapes:
        args = args.replace(tie_word_embeddings=True)
    check_layers(target / "params.json", "n_layers", args.n_layers, shapes)
    return args, shapes
