"""A decode step without host syncs, in static shapes, for CUDA graphs (gpt-fast's recipe over the paged cache).

``TorchDecoder.step`` reads the positions on the host (``int(positions.max())`` in the cache's ``prepare``)
and attends over exactly the keys a batch has, so every step has new shapes and several host syncs: on a
GPU the ~400 kernel launches per token then cost more than the matmuls. ``StaticDecoder.step`` instead runs

    step(tokens (B,), positions (B,), tables (B, n_blocks)) -> logits (B, vocab)

as one function of device tensors only: where each new key goes (``table[pos // block_size]``, offset
``pos % block_size``) and which keys each row sees (``key <= pos``) are tensor ops, so nothing on the path
reads a value back to Python. Its shapes come from two buckets chosen on the host from what the engine
already knows there: the batch padded up to 1, 2, 4, ..., 64 rows, and the block tables padded up to a
power of two of blocks (at least ``MIN_KV_BLOCKS``). Each (batch, blocks) pair is one shape; on CUDA the
step is ``torch.compile(mode="reduce-overhead")``d, so each shape is compiled once and replayed as a CUDA
graph (one launch per token). On a CPU it runs eagerly (or under ``torch.compile`` for tests).

Padding rows write their keys into the cache's ``scratch`` block (which no sequence ever gets), so they never
touch a sequence's cache; a real row's table is padded with that block too, and the mask hides it. Prefill is
``TorchDecoder.prefill``: ``Transformer.forward`` in chunks, whose attention is SDPA: FlashAttention on CUDA
for a prompt's first chunk (causal), the memory-efficient kernel for later ones (a boolean mask; with
``ExpandedPagedView``'s K/V heads).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Sequence

import torch

from ..device_sampling import host_to_device
from ..model import Transformer
from .cache import PagedKVCache, PagedView
from .decoders import TorchDecoder

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_KV_BLOCKS = 16  # the smallest table width: 16 blocks of 32 positions = 512 keys
COMPILE_MODES = ("eager", "default", "reduce-overhead")


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest size >= n (ValueError when n exceeds them all)."""
    for s in sizes:
        if s >= n:
            return s
    raise ValueError(f"{n} is larger than the largest bucket {sizes[-1]}")


def kv_bucket(blocks: int, limit: int) -> int:
    """Table width for ``blocks`` blocks: the next power of two, at least MIN_KV_BLOCKS, at most ``limit``."""
    return min(max(MIN_KV_BLOCKS, 1 << max(0, blocks - 1).bit_length()), max(limit, blocks))


class StaticPagedView:
    """The two cache methods ``Transformer.forward`` calls, over the paged pool with fixed-width block tables
    and no host reads: ``prepare`` returns a mask over all ``n_blocks * block_size`` keys of the table."""

    def __init__(self, pool: torch.Tensor, tables: torch.Tensor, block_size: int):
        self.pool, self.tables, self.block_size = pool, tables, block_size  # tables (batch, n_blocks)

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        bs = self.block_size
        self.slot_block = self.tables.gather(1, positions // bs)  # (batch, seq): the block of each new token
        self.slot_offset = positions % bs
        keys = torch.arange(self.tables.shape[1] * bs, device=positions.device)
        return keys[None, None, None, :] <= positions[:, None, :, None]  # (batch, 1, seq, keys)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, kv_heads, _, head_dim = k.shape
        out = []
        for i, new in enumerate((k, v)):
            # pool[block, layer, i, :, offset] is indexed as (batch, seq, heads, head_dim)
            self.pool[self.slot_block, layer, i, :, self.slot_offset] = new.transpose(1, 2).to(self.pool.dtype)
            blocks = self.pool[self.tables, layer, i]  # (batch, n_blocks, heads, block_size, head_dim)
            out.append(blocks.transpose(1, 2).reshape(batch, kv_heads, -1, head_dim))
        return out[0], out[1]


class ExpandedPagedView(PagedView):
    """``PagedView`` whose masked attention sees as many key/value heads as query heads. A prefill chunk
    after a prompt's first attends through a boolean mask; on CUDA FlashAttention takes no mask, and the
    memory-efficient kernel takes one but not grouped-query heads, so SDPA would fall back to its plain
    math (a (heads, chunk, keys) score matrix). Repeating each K/V head n_rep times keeps it on the
    memory-efficient kernel. Unmasked (causal) chunks keep the grouped heads: FlashAttention takes them."""

    def __init__(self, cache: PagedKVCache, sids: Sequence[int], n_rep: int):
        super().__init__(cache, sids)
        self.n_rep, self.masked = n_rep, False

    def prepare(self, positions: torch.Tensor) -> torch.Tensor | None:
        mask = super().prepare(positions)
        self.masked = mask is not None
        return mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().update(layer, k, v)
        if self.masked and self.n_rep > 1:  # (batch, n_kv_heads, keys, hd) -> (batch, n_heads, keys, hd)
            k, v = k.repeat_interleave(self.n_rep, dim=1), v.repeat_interleave(self.n_rep, dim=1)
        return k, v


def decode_step(model: Transformer, pool: torch.Tensor, block_size: int, tokens: torch.Tensor,
                positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Logits (batch, vocab) float32 for one new token per row: tokens (batch,) at positions (batch,) of the
    sequences whose blocks are ``tables`` (batch, n_blocks). Reads nothing back to the host."""
    view = StaticPagedView(pool, tables, block_size)
    return model(tokens[:, None], start_pos=positions, cache=view)[:, -1]


def use_inductor_cache() -> str:
    """Point inductor's on-disk cache (compiled kernels, FX graphs) at ~/.cache/llama3/inductor, unless the
    user chose a directory (TORCHINDUCTOR_CACHE_DIR): a second run then loads the step instead of compiling
    it, and the cache outlives /tmp. Inductor itself sets the variable to its /tmp default on first use, so
    that value counts as not chosen. Returns the directory in use."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.path.expanduser("~"), ".cache", "llama3", "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class StaticDecoder(TorchDecoder):
    """The sync-free static-shape step (``decode_step``) in batch and table buckets, compiled per ``compile``:
    "reduce-overhead" (CUDA graphs; the default on CUDA), "default" (inductor kernels, no graphs), or "eager"
    (the default on CPUs). ``compile_seconds`` records the first call of each shape (compile plus capture)."""

    name = "static"

    def __init__(self, model: Transformer, cache: PagedKVCache, compile: str | None = None,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS, expand_kv: bool | None = None):
        """``expand_kv``: masked prefill chunks through ``ExpandedPagedView`` (default: on CUDA)."""
        super().__init__(model, cache, batch_invariant=False)
        self.expand_kv = self.device.type == "cuda" if expand_kv is None else expand_kv
        mode = compile or ("reduce-overhead" if self.device.type == "cuda" else "eager")
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; expected one of {', '.join(COMPILE_MODES)}")
        self.mode, self.batch_buckets = mode, tuple(sorted(batch_buckets))
        self.scratch = cache.scratch  # padding rows write there, and tables are padded with it
        self.max_blocks = math.ceil(model.args.max_seq_len / cache.block_size)
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self._fn, self.cache_dir = decode_step, None
        if mode != "eager":
            self.cache_dir = use_inductor_cache()
            if self.device.type == "cuda":  # the pool is written in place: CUDA graphs need its address fixed
                torch._dynamo.mark_static_address(cache.pool)
            self._fn = torch.compile(decode_step, mode=None if mode == "default" else mode, fullgraph=True,
                                     dynamic=False)
        n_shapes = len(self.batch_buckets) * (int(math.log2(max(self.max_blocks, MIN_KV_BLOCKS))) + 1)
        self._limits = torch._dynamo.config.patch(recompile_limit=n_shapes + 8,
                                                  accumulated_recompile_limit=4 * n_shapes + 64)

    def inputs(self, tokens: Sequence[int], positions: Sequence[int],
               slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's device inputs, padded to the buckets: one host-to-device copy of one packed buffer
        (pinned on CUDA, so it does not wait for the GPU)."""
        n = len(tokens)
        if not 0 < n == len(positions) == len(slots):
            raise ValueError(f"step needs as many tokens, positions and slots (>= 1), got {n}, {len(positions)}, "
                             f"{len(slots)}")
        batch = bucket(n, self.batch_buckets)
        bs = self.cache.block_size
        width = kv_bucket(max(p // bs + 1 for p in positions), self.max_blocks)
        rows = []  # [token, position, its table padded with the scratch block]
        for token, pos, sid in zip(tokens, positions, slots):
            blocks = self.cache.blocks_of(sid)[:width]
            if len(blocks) * bs <= pos:
                raise ValueError(f"sequence {sid} has no block reserved for position {pos}")
            rows.append([token, pos, *blocks] + [self.scratch] * (width - len(blocks)))
        rows += [[0, 0] + [self.scratch] * width] * (batch - n)  # padding: token 0 at position 0 of the scratch
        packed = torch.tensor(rows, dtype=torch.int64)  # (batch, 2 + width)
        packed = host_to_device(packed, self.device)
        return packed[:, 0], packed[:, 1], packed[:, 2:]

    @torch.inference_mode()
    def step_on_device(self, tokens, positions, slots) -> torch.Tensor:
        """Logits (len(tokens), vocab) float32, left on the device (valid until the next step). A batch larger
        than the largest bucket runs in pieces of that size."""
        top = self.batch_buckets[-1]
        if len(tokens) > top:  # each piece's output is copied out before the next replay overwrites it
            return torch.cat([self.step_on_device(tokens[i:i + top], positions[i:i + top], slots[i:i + top]).clone()
                              for i in range(0, len(tokens), top)])
        ids, pos, tables = self.inputs(tokens, positions, slots)
        shape = tuple(tables.shape)
        first = shape not in self.compile_seconds
        start = time.perf_counter()
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
        with self._limits:
            logits = self._fn(self.model, self.cache.pool, self.cache.block_size, ids, pos, tables)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds[shape] = time.perf_counter() - start
            if self.mode != "eager":  # a pause of seconds to minutes: say why
                print(f"llama3: compiled the decode step for batch {shape[0]} x {shape[1]} blocks in "
                      f"{self.compile_seconds[shape]:.1f} s (cached in {self.cache_dir})",
                      file=sys.stderr)
        return logits[:len(tokens)]

    def prefill_view(self, slot: int):
        if self.expand_kv:
            return ExpandedPagedView(self.cache, [slot], self.model.args.n_rep)
        return super().prefill_view(slot)

    def step(self, tokens, positions, slots):
        return self.step_on_device(tokens, positions, slots).float().cpu()

    def describe(self) -> str:
        how = {"eager": "eager", "default": "torch.compile", "reduce-overhead": "torch.compile + CUDA graphs"}
        return f"static-shape step on {self.device.type} ({how[self.mode]}, batch buckets " \
               f"{'/'.join(map(str, self.batch_buckets))})"
