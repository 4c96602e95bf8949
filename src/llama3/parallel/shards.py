"""Reading one rank's slices straight from a checkpoint's memory map, for any world size.

Every format is first checked as ``llama3.weights`` checks it (header, config, every shape); then each
tensor is taken as a view of the mapped file (no page read yet), narrowed to the rank's rows or columns
(``split.tensor_slice``), and only that slice is read and converted (``finish_tensor``). So a rank reads
about 1/N of the file and holds about 1/N of the weights (plus the replicated norms, and replicated KV
heads where the split needs them); no rank ever holds the whole model.

- Meta ``consolidated.NN.pth`` shards of any count M: a tensor is the join of its M parts along Meta's
  model-parallel dimension; the rank's ranges are taken from the parts that hold them (re-sliced, never
  joined whole), whether M is N, 1, or anything else.
- Hugging Face safetensors: q/k rows of whole heads are taken, then permuted to Meta's layout per head.
- GGUF: quantized blocks stay blocks. Rows are whole rows of blocks (a view of the map); columns are cut
  at block boundaries (a copy of those bytes); a cut inside a block dequantizes that slice only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..quantize import QuantTensor
from ..weights.common import (Checkpoint, CheckpointError, FileMap, ReadOptions, check_layers, check_shapes,
                              file_ranges, finish_tensor, read_json_object, release_pages)
from .split import Split, plan, slice_blocks, take, tensor_slice


def read_shard_checkpoint(path, world: int, rank: int, opts: ReadOptions | None = None) -> tuple[Checkpoint, Split]:
    """This rank's ``Checkpoint`` (its slices only, Meta-named, shapes as ``Split`` says) and its split."""
    from ..weights import detect_format

    opts = opts or ReadOptions()
    fmt, target = detect_format(path)
    reader = {"gguf": _gguf, "hf": _hf, "meta": _meta}[fmt]
    return reader(target, world, rank, opts)


def _finish(path, name: str, t: torch.Tensor, opts: ReadOptions, dequantized: list):
    """A float slice -> what the rank holds; a strided slice (columns) is copied first, so that the
    rank keeps only its own bytes rather than a view spanning the whole tensor's pages."""
    return finish_tensor(path, name, t if t.is_contiguous() else t.contiguous(), opts, dequantized)


# ------------------------------------------------------------------------------------------------- Meta
def _meta(folder: Path, world: int, rank: int, opts: ReadOptions):
    from ..weights.meta import args_from_params, merged_shapes, read_shard, split_dim

    args = args_from_params(folder, read_json_object(folder / "params.json"))
    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(folder, "no consolidated.*.pth files")
    shards = [read_shard(p) for p in paths]  # memory-mapped: nothing is read until a slice is
    shapes = merged_shapes(shards, paths)
    shapes.pop("rope.freqs", None)
    if "output.weight" not in shapes and not args.tie_word_embeddings:
        args = args.replace(tie_word_embeddings=True)
    check_layers(folder / "params.json", "n_layers", args.n_layers, shapes)
    check_shapes(folder, args, shapes)
    split = plan(args, world, rank)
    mapped = [file_ranges(p) for p in paths]
    state, dequantized = {}, []
    for name in shapes:
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        parts = [s[name] for s in shards]
        mp_dim = split_dim(name) if len(parts) > 1 else None
        spec = tensor_slice(name, args, split)
        if spec is None:
            t = parts[0]
        elif mp_dim is None or mp_dim == spec[0]:  # our cut runs along Meta's: take from the parts that hold it
            t = take(parts if mp_dim is not None else parts[:1], *spec)
        else:  # cut each part, then join the (small) pieces
            t = torch.cat([take([p], *spec) for p in parts], mp_dim)
        state[name] = _finish(folder, name, t, opts, dequantized)
        if spec is not None and spec[0] == 1:  # a column cut touched every row's pages: let them go
            for p, ranges in zip(parts, mapped):
                if any(s <= p.data_ptr() and p.data_ptr() + p.nbytes <= e for s, e in ranges):
                    release_pages(p.data_ptr(), p.nbytes)
    return Checkpoint(folder, "meta", args, state, dequantized=dequantized), split


# --------------------------------------------------------------------------------------- Hugging Face
def _hf(folder: Path, world: int, rank: int, opts: ReadOptions):
    from ..weights.hf import _view, hf_to_meta_qk, index_hf_folder

    args, _, where = index_hf_folder(folder)
    split = plan(args, world, rank)
    maps: dict[Path, FileMap] = {}
    state, dequantized = {}, []
    for meta, (file, key, e) in where.items():
        if meta == "output.weight" and args.tie_word_embeddings:
            continue
        fm = maps.setdefault(file, FileMap(file))
        t = _view(file, fm, key, e)  # the whole tensor as a view of the map: no page read yet
        spec = tensor_slice(meta, args, split)
        if spec is not None:
            t = take([t], *spec)
        if meta.endswith(("attention.wq.weight", "attention.wk.weight")):
            # whole heads were taken, so HF's permutation (inside each head) is undone per local head
            t = hf_to_meta_qk(t, t.shape[0] // args.head_dim)
        state[meta] = _finish(file, meta, t, opts, dequantized)
        if spec is not None and spec[0] == 1:
            fm.release(e.begin, e.end - e.begin)
    return Checkpoint(folder, "hf", args, state, dequantized=dequantized), split


# ------------------------------------------------------------------------------------------------- GGUF
def _gguf(path: Path, world: int, rank: int, opts: ReadOptions):
    from ..weights.gguf import _float_view, index_gguf, read_tensor

    path = str(path)
    header, args, infos = index_gguf(path, opts)
    fm = FileMap(path)
    if "rope_freqs.weight" in header.tensors:
        info = header.tensors["rope_freqs.weight"]
        divisors = _float_view(fm.bytes[info.offset:info.offset + info.n_bytes], "F32")
        if info.kind != "F32" or not (torch.isfinite(divisors).all() and (divisors > 0).all()):
            raise CheckpointError(path, "tensor 'rope_freqs.weight' must be positive finite F32 values")
        args = args.replace(rope_freq_divisors=tuple(float(x) for x in divisors))
    split = plan(args, world, rank)
    state, dequantized = {}, []
    for meta, info in infos.items():
        raw = fm.bytes[info.offset:info.offset + info.n_bytes]
        spec = tensor_slice(meta, args, split)
        if spec is None:
            state[meta] = read_tensor(path, meta, info, raw, opts, dequantized)
            continue
        # the tensor as (rows, row bytes) of its blocks, a view of the map; cut like a QuantTensor's rows
        whole = QuantTensor.from_gguf(raw, info.kind, info.shape) if info.kind in _kinds() else None
        dim, ranges = spec
        if whole is not None:
            part = slice_blocks(whole, dim, ranges, torch.float32)
        else:  # a kind without kernels: dequantized (by rows) as the single-process reader would
            part = take([read_tensor(path, meta, info, raw, dataclasses.replace(opts, keep=frozenset()), [])], dim, ranges)
        if isinstance(part, QuantTensor):  # the slice's own bytes, read as the whole file's reader would read them
            local = dataclasses.replace(info, shape=part.shape, n_bytes=part.nbytes)
            state[meta] = read_tensor(path, meta, local, part.data.reshape(-1).numpy(), opts, dequantized)
        else:  # columns cut inside blocks: this slice was dequantized
            if opts.keep and info.kind != "F32":
                dequantized.append((meta, info.kind))
            state[meta] = _finish(path, meta, part, dataclasses.replace(opts, keep=frozenset()), [])
        if dim == 1:
            fm.release(info.offset, info.n_bytes)
    return Checkpoint(Path(path), "gguf", args, state, header.metadata, dequantized), split


def _kinds() -> set[str]:
    from ..kernels import BLOCK

    return set(BLOCK)
