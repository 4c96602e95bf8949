"""Tensor parallelism over torch.distributed: one model split over N processes (GPUs, or CPU ranks).

    split.py    how a model splits (heads, KV heads, FFN, vocabulary) and the transform on a built model
    shards.py   each rank reading only its slices of a Meta / Hugging Face / GGUF checkpoint
    runtime.py  process groups, rank 0's decoder, the other ranks' loop, launching and failures

``load(session, path)`` is ``llama3.load`` for one rank: rank 0 gets a ``Llama`` whose engine drives all
ranks, the others a shard to run ``worker_loop`` on.
"""

from __future__ import annotations

from .runtime import (DEFAULT_TIMEOUT, ParallelDecoder, ParallelError, Session, init, spawn_ranks, worker_loop,
                      world_from_env)
from .split import Split, add_collectives, describe_split, parallelize, plan, weight_bytes
from .loader import load, load_shard

__all__ = ["DEFAULT_TIMEOUT", "ParallelDecoder", "ParallelError", "Session", "Split", "add_collectives",
           "describe_split", "init", "load", "load_shard", "parallelize", "plan", "spawn_ranks", "weight_bytes",
           "worker_loop", "world_from_env"]
