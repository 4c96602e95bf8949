"""``load`` for one rank of a tensor-parallel run (the same options as ``llama3.load``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..weights.common import ReadOptions
from .runtime import Session
from .shards import read_shard_checkpoint
from .split import build_shard, describe_split


def load_shard(session: Session, path=None, *, dtype=None, quantize: str | None = "auto", check: bool = True,
               prefill_dtype="auto"):
    """(this rank's ``Checkpoint`` of slices, its sharded Transformer with collectives, on ``session.device``)."""
    import torch

    from .. import kernels
    from ..engine.policy import choose_prefill_dtype, prefill_kernel_rows
    from ..loading import check_quantize, default_dtype, parse_dtype
    from ..quantize import set_prefill_dtype
    from ..weights import default_model_path

    device = session.device
    dtype = parse_dtype(dtype) or default_dtype(device)
    kind = check_quantize(None if quantize == "none" else quantize)
    if kind and device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU kernels; use device='cpu' or quantize=None")
    keep = kernels.SUPPORTED_KINDS if quantize == "auto" and device.type == "cpu" and kernels.library() else ()
    path = default_model_path() if path is None else Path(os.path.expanduser(str(path)))
    opts = ReadOptions(dtype=dtype, keep=frozenset(keep), quantize=kind, check=check)
    ckpt, split = read_shard_checkpoint(path, session.world, session.rank, opts)
    model = build_shard(ckpt.args, ckpt.state, split, session.group, device=device, path=ckpt.path)
    gemm = parse_dtype(prefill_dtype) or getattr(torch, choose_prefill_dtype(device).name)
    set_prefill_dtype(model, gemm, prefill_kernel_rows(gemm))
    ckpt.state = {}
    return ckpt, model


def load(session: Session, path=None, *, dtype=None, quantize: str | None = "auto", max_context: int | None = None,
         check: bool = True):
    """Rank 0: a ``Llama`` whose engine runs every rank (``ParallelDecoder``); other ranks: their shard."""
    from ..generation import Llama
    from ..loading import tokenizer_and_chat

    ckpt, model = load_shard(session, path, dtype=dtype, quantize=quantize, check=check)
    if session.rank != 0:
        return model
    note = describe_split(ckpt.args, session.world)[-1]
    if "replicated" in note:
        warnings.warn(note, stacklevel=2)
    from ..sampling import model_sampling_defaults

    tokenizer, chat = tokenizer_and_chat(ckpt)
    model.tp_session = session  # every engine made on it drives all ranks (engine.policy.make_decoder)
    llm = Llama(ckpt.args, model, tokenizer, chat, str(ckpt.path), ckpt.format, max_context)
    llm.sampling_defaults, llm.sampling_defaults_source = model_sampling_defaults(
        ckpt.path, ckpt.gguf_metadata if ckpt.format == "gguf" else None)
    llm.dequantized = list(ckpt.dequantized)
    return llm
