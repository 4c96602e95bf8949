"""A paged key/value cache with prefix reuse (vLLM's PagedAttention and automatic prefix caching,
llama.cpp's unified cache and ``cache_prompt``).

Memory is one pool of fixed-size blocks, each holding ``block_size`` consecutive positions of one
sequence for every layer: ``pool`` is (n_blocks + 1, n_layers, 2 (k, v), n_kv_heads, block_size, head_dim)
(the last block, ``scratch``, is never given to a sequence).
A sequence owns a block table (its blocks in position order): position p lives in block
``table[p // block_size]`` at offset ``p % block_size``. Blocks are handed out as sequences grow and
given back when they end, so memory follows the tokens actually in flight: on the CPU the pool is
reserved address space whose pages become resident only when written, and a freed block's pages
are returned to the system.

Prefix reuse: once a block is full, it is filed under (the key of the block before it, its tokens).
A new sequence whose prompt starts with the same tokens takes those blocks (shared, reference
counted) and only the rest of the prompt is computed. Blocks of finished sequences stay filed and
are evicted least-recently-used when memory is needed. Shared blocks are full and never written
again; each sequence writes only into blocks it owns alone.
"""

from __future__ import annotations

import heapq
import math
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..config import ModelArgs

DEFAULT_BLOCK_SIZE = 32


def default_kv_dtype(model) -> torch.dtype:
    """float16 for CPU models whose matrices are blocks (half the bytes decode attention reads per step,
    converted in registers); the model's own dtype otherwise, so the exact float path stays exact."""
    from ..quantize import QuantLinear

    dtype = model.norm.weight.dtype
    if model.norm.weight.device.type == "cpu" and any(isinstance(m, QuantLinear) for m in model.layers.modules()):
        return torch.float16
    return dtype


def memory_budget_bytes(device: torch.device) -> int:
    """How much memory the cache may grow into by default: 40% of the machine's RAM on a CPU (only what
    is written becomes resident), half the free memory on a GPU (allocated up front there)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.4)
    except (ValueError, OSError):
        return 4 << 30


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # tokens whose keys and values are stored, in order
    keys: list[tuple] = field(default_factory=list)  # prefix key of each full block


class CacheFull(Exception):
    """No block is free, none can be evicted, and the pool is at its size."""


class PagedKVCache:
    def __init__(self, args: ModelArgs, max_tokens: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: torch.dtype | None = None, device=None, prefix_caching: bool = True,
                 kv_heads: int | None = None):
        """A pool for ``max_tokens`` positions in all (rounded up to whole blocks). ``kv_heads``: the KV heads
        the model's attention layers produce (a tensor-parallel rank's share; default ``args.kv_heads``)."""
        device = torch.device(device or "cpu")
        self.args, self.block_size, self.device = args, block_size, device
        self.dtype = dtype or torch.float16
        self.n_blocks = max(1, math.ceil(max_tokens / block_size))
        self.prefix_caching = prefix_caching
        # One block more than sequences can get: ``scratch``, where writes that must land somewhere and mean
        # nothing go (the padding rows of a static-shape step, llama3.engine.static).
        self.scratch = self.n_blocks
        shape = (self.n_blocks + 1, args.n_layers, 2, kv_heads or args.kv_heads, block_size, args.head_dim)
        self.block_bytes = math.prod(shape[1:]) * torch.finfo(self.dtype).bits // 8
        self._mm = None
        if device.type == "cpu":  # address space only: a page becomes resident when first written
            self._mm = mmap.mmap(-1, shape[0] * self.block_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.pool = torch.frombuffer(self._mm, dtype=torch.uint8).view(self.dtype).view(shape)
        else:
            self.pool = torch.zeros(shape, dtype=self.dtype, device=device)
        self._free = list(range(self.n_blocks))  # a heap: lowest ids first keeps resident memory compact
        self._refs = [0] * self.n_blocks
        self._key_of: dict[int, tuple] = {}  # block -> its prefix key, for filed blocks
        self._filed: dict[tuple, int] = {}  # prefix key -> block
        self._idle: OrderedDict[int, None] = OrderedDict()  # filed blocks no sequence uses, oldest first
        self._seqs: dict[int, _Seq] = {}
        self._next_id = 0
        self.hits = 0  # prompt tokens served from filed blocks, in all

    # ------------------------------------------------------------------ sequences
    def open(self, tokens: Sequence[int], reuse: bool = True) -> tuple[int, int]:
        """Start a sequence that will hold ``tokens`` first; returns (its id, how many of those tokens are
        already stored: whole blocks of an earlier identical prefix, always fewer than len(tokens) so
        that at least one token is computed and gives logits; 0 without ``reuse``)."""
        sid, self._next_id = self._next_id, self._next_id + 1
        seq = self._seqs[sid] = _Seq()
        if not (self.prefix_caching and reuse):
            return sid, 0
        bs, parent = self.block_size, None
        for i in range((len(tokens) - 1) // bs):
            key = (hash(parent), tuple(tokens[i * bs:(i + 1) * bs]))
            block = self._filed.get(key)
            if block is None:
                break
            self._take(block)
            seq.blocks.append(block)
            seq.keys.append(key)
            parent = key
        seq.tokens = list(tokens[:len(seq.blocks) * bs])
        self.hits += len(seq.tokens)
        return sid, len(seq.tokens)

    def reserve(self, sid: int, length: int) -> None:
        """Make room for positions < ``length`` of sequence ``sid`` (CacheFull if there is none)."""
        seq = self._seqs[sid]
        while len(seq.blocks) * self.block_size < length:
            seq.blocks.append(self._allocate())

    def append(self, sid: int, tokens: Sequence[int]) -> None:
        """Record that the keys and values of ``tokens`` (the sequence's next positions) are now stored;
        blocks that become full are filed for reuse."""
        seq, bs = self._seqs[sid], self.block_size
        seq.tokens.extend(tokens)
        while self.prefix_caching and len(seq.keys) < len(seq.tokens) // bs:
            i = len(seq.keys)
            key = (hash(seq.keys[-1] if seq.keys else None), tuple(seq.tokens[i * bs:(i + 1) * bs]))
            seq.keys.append(key)
            block = seq.blocks[i]
            if key not in self._filed and block not in self._key_of:
                self._filed[key] = block
                self._key_of[block] = key

    def close(self, sid: int) -> None:
        """The sequence ended: its blocks go back (filed ones stay reusable until evicted)."""
        for block in self._seqs.pop(sid).blocks:
            self._release(block)

    def length(self, sid: int) -> int:
        return len(self._seqs[sid].tokens)

    def blocks_of(self, sid: int) -> list[int]:
        return self._seqs[sid].blocks

    # --------------------------------------------------------------------- blocks
    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            self._idle.pop(block, None)
        self._refs[block] += 1

    def _allocate(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        elif self._idle:  # evict the least recently used filed block
            block, _ = self._idle.popitem(last=False)
            del self._filed[self._key_of.pop(block)]
        else:
            raise CacheFull(f"all {self.n_blocks} KV-cache blocks ({self.n_blocks * self.block_size} positions) "
                            "are in use")
        self._refs[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block]:
            return
        if block in self._key_of:
            self._idle[block] = None  # most recently used last
        else:
            heapq.heappush(self._free, block)
            if self._mm is not None:  # give the pages back: memory follows the tokens in flight
                self._mm.madvise(mmap.MADV_DONTNEED, block * self.block_bytes, self.block_bytes)

    # ---------------------------------------------------------------------- views
    def view(self, sids: Sequence[int]) -> "PagedView":
        """The cache as ``Transformer.forward`` sees it for a batch of these sequences (row b = sids[b])."""
        return PagedView(self, sids)

    def block_table(self, sids: Sequence[int]) -> torch.Tensor:
        """(len(sids), most blocks) int64, padded with block 0 (never read past a sequence's length)."""
        tables = [self._seqs[s].blocks for s in sids]
        width = max(1, max(len(t) for t in tables))
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)

    # ---------------------------------------------------------------------- stats
    @property
    def blocks_in_use(self) -> int:
        return sum(1 for r in self._refs if r)

    @property
    def blocks_filed(self) -> int:
        return len(self._key_of)

    @property
    def blocks_free(self) -> int:
        """Blocks a sequence can still get (free ones plus filed ones nobody uses)."""
        return len(self._free) + len(self._idle)

    def resident_bytes(self) -> int:
        """Memory the pool holds now: blocks in use or filed (free blocks hold none)."""
        return (self.n_blocks - len(self._free)) * self.block_bytes


class PagedView:
    """The two methods ``Transformer.forward`` calls on a cache, over a batch of paged sequences:
    ``prepare(positions)`` once per call, ``update(layer, k, v)`` in every layer."""

    def __init__(self, cache: PagedKVCache, sids: Sequence[int]):
        self.cache = cache
        self.tables = cache.block_table(sids).to(cache.device)  # (batch, blocks)

    def prepare(self, positions: torch.Tensor) -> torch.Tensor | None:
        batch, bs = self.tables.shape[0], self.cache.block_size
        pos = positions.expand(batch, -1)  # (batch, seq)
        self.slot_block = self.tables.gather(1, pos // bs)  # where each new token's keys go
        self.slot_offset = pos % bs
        self.kv_len = int(positions.max()) + 1
        self.read = self.tables[:, :math.ceil(self.kv_len / bs)]
        if batch == 1 and int(positions[0, 0]) in (0, self.kv_len - 1):  # all keys, or plain causal
            return None
        keys = torch.arange(self.kv_len, device=positions.device)
        return keys[None, None, None, :] <= pos[:, None, :, None]  # (batch, 1, seq, kv_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.cache.pool
        batch, kv_heads, _, head_dim = k.shape
        out = []
        for i, new in enumerate((k, v)):
            # pool[block, layer, i, :, offset] is indexed as (batch, seq, heads, head_dim)
            pool[self.slot_block, layer, i, :, self.slot_offset] = new.transpose(1, 2).to(pool.dtype)
            blocks = pool[self.read, layer, i]  # (batch, blocks, heads, block_size, head_dim)
            out.append(blocks.transpose(1, 2).reshape(batch, kv_heads, -1, head_dim)[:, :, :self.kv_len])
        return out[0], out[1]
