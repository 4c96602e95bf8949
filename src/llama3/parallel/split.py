"""How a model splits over N ranks, and the transform that turns a built model into one rank's shard.

Megatron-LM's scheme, as Meta's fairscale layers and gpt-fast's ``tp.py`` apply it to Llama:

    wq, wk, wv, w1, w3   column-parallel: each rank holds some output rows (its heads, its FFN slice)
    wo, w2               row-parallel: the matching input columns; partial sums, one all-reduce each
    tok_embeddings       vocabulary-parallel: rows of its token ids, zeros elsewhere, one all-reduce
    output               vocabulary-parallel: logits of its ids, one all-gather
    norms, RoPE          replicated

so a block costs two all-reduces of (batch, seq, dim) and everything between them is local.

Heads: rank r holds query heads [r·H/N, (r+1)·H/N) (as even as the count allows, so 9 heads on 2 ranks
are 5 + 4). It needs the KV heads of those queries' groups. When its query heads are whole groups
(N divides n_kv_heads and n_heads), it holds those KV heads once. Otherwise KV heads are *replicated*:
with N > n_kv_heads each rank's queries fall in one group and it holds that one KV head (vLLM's rule),
and where a rank's queries split a group unevenly (9 heads, 3 KV heads, 2 ranks) each of its query heads
gets its own copy of its KV head, so that attention on the rank is plain grouped-query attention again.
``describe_split`` says which.

Why the collectives are hand-written hooks rather than ``torch.distributed.tensor.parallel``:
``parallelize_module``'s ``ColwiseParallel``/``RowwiseParallel`` shard ``nn.Linear``/``nn.Embedding``
weights with ``distribute_tensor``, which starts from the whole tensor on a rank, splits along
``torch.chunk`` boundaries, and turns every activation into a DTensor whose dispatch costs more than a
small decode step. Here each rank reads only its slice from the file, splits at head boundaries (uneven,
with KV replication), keeps GGUF blocks as ``QuantLinear`` buffers (which DTensor does not know), and
needs exactly one collective per row-parallel layer: a forward hook that all-reduces, as gpt-fast does.
The collectives themselves are torch.distributed's (``all_reduce``, ``all_gather``; gloo or NCCL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelArgs
from ..model import Transformer
from ..quantize import QuantEmbedding, QuantLinear, QuantTensor

# A row range [lo, hi) of a tensor along one dimension.
Range = tuple[int, int]
_QUANT_ALIGN = (256, 32)  # K-quant super-blocks and legacy blocks: FFN cuts fall on these where they can


def _cut(n: int, world: int, rank: int, align: int = 1) -> Range:
    """Rank's share of n items split as evenly as possible, at multiples of ``align``."""
    units = n // align
    return rank * units // world * align, (rank + 1) * units // world * align


@dataclass(frozen=True)
class Split:
    """What one rank holds: ``heads`` (query heads [lo, hi)), ``kv_heads`` (the model's KV head behind
    each local KV head, repeats meaning copies), ``hidden`` (FFN columns [lo, hi)), ``vocab`` (token ids
    [lo, hi)); ``vocab_ranges`` are every rank's, for gathering logits."""

    rank: int
    world: int
    heads: Range
    kv_heads: tuple[int, ...]
    hidden: Range
    vocab: Range
    vocab_ranges: tuple[Range, ...]

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return len(self.kv_heads)


def plan(args: ModelArgs, world: int, rank: int) -> Split:
    """Rank ``rank``'s share of a model split over ``world`` ranks (ValueError if it cannot be split)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of {world}: need 0 <= rank < world >= 1")
    for name, n in (("n_heads", args.n_heads), ("FFN hidden size", args.hidden_dim), ("vocab_size", args.vocab_size)):
        if n < world:
            raise ValueError(f"cannot split {name} = {n} over {world} ranks: use at most {n} ranks")
    lo, hi = _cut(args.n_heads, world, rank)
    groups = [h // args.n_rep for h in range(lo, hi)]  # the KV head of each local query head
    # The widest uniform grouping: runs of `r` consecutive local query heads that share one KV head.
    r = next(r for r in range(len(groups), 0, -1)
             if len(groups) % r == 0 and all(groups[j] == groups[j - j % r] for j in range(len(groups))))
    align = next((a for a in _QUANT_ALIGN if args.hidden_dim % (a * world) == 0), 1)  # equal cuts on block bounds
    vocab = tuple(_cut(args.vocab_size, world, i) for i in range(world))
    return Split(rank, world, (lo, hi), tuple(groups[::r]), _cut(args.hidden_dim, world, rank, align), vocab[rank], vocab)


def describe_split(args: ModelArgs, world: int) -> list[str]:
    """One line per rank (heads, KV heads, FFN and vocabulary slices), and a note when KV heads are replicated."""
    splits = [plan(args, world, r) for r in range(world)]
    lines = [f"rank {s.rank}: query heads {s.heads[0]}-{s.heads[1] - 1}, KV heads {list(s.kv_heads)}, "
             f"FFN {s.hidden[0]}:{s.hidden[1]}, vocabulary {s.vocab[0]}:{s.vocab[1]}" for s in splits]
    held = sum(s.n_kv_heads for s in splits)
    if held > args.kv_heads:
        lines.append(f"{world} ranks do not split {args.kv_heads} KV heads (of {args.n_heads} query heads) into whole "
                     f"groups: KV heads are replicated, {held} held in all instead of {args.kv_heads}")
    return lines


def _merge(ranges: list[Range]) -> list[Range]:
    out: list[Range] = []
    for lo, hi in ranges:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def tensor_slice(name: str, args: ModelArgs, split: Split) -> tuple[int, list[Range]] | None:
    """(dimension, ranges along it) of Meta-named tensor ``name`` that ``split``'s rank holds; None: all of it."""
    module, hd = name.split(".")[-2], args.head_dim
    q_rows = (split.heads[0] * hd, split.heads[1] * hd)
    if module == "wq":
        return 0, [q_rows]
    if module in ("wk", "wv"):
        return 0, _merge([(h * hd, (h + 1) * hd) for h in split.kv_heads])
    if module == "wo":
        return 1, [q_rows]
    if module in ("w1", "w3"):
        return 0, [split.hidden]
    if module == "w2":
        return 1, [split.hidden]
    if module in ("tok_embeddings", "output"):
        return 0, [split.vocab]
    return None


def take(parts: list[torch.Tensor], dim: int, ranges: list[Range]) -> torch.Tensor:
    """The ``ranges`` along ``dim`` of the tensor that ``parts`` make when joined along ``dim`` (Meta's
    model-parallel shards, or one whole tensor), without joining them: a view when one part holds it all."""
    pieces, start = [], 0
    bounds = []
    for p in parts:
        bounds.append((start, start + p.shape[dim]))
        start += p.shape[dim]
    for lo, hi in ranges:
        for p, (s, e) in zip(parts, bounds):
            a, b = max(lo, s), min(hi, e)
            if a < b:
                pieces.append(p.narrow(dim, a - s, b - a))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def block_size(kind: str) -> tuple[int, int]:
    """(values, bytes) of one block of GGML ``kind`` (1 value for F32/F16/BF16)."""
    from ..kernels import BLOCK

    return BLOCK[kind]


def slice_blocks(qt: QuantTensor, dim: int, ranges: list[Range], dtype: torch.dtype) -> QuantTensor | torch.Tensor:
    """A QuantTensor's share: rows are sliced in place (whole rows of blocks); columns at block boundaries
    become a copy of those bytes of each row; columns inside blocks are dequantized (to ``dtype``) and cut."""
    if dim == 0:
        data = take([qt.data], 0, ranges)
        return QuantTensor(qt.kind, data.contiguous(), data.shape[0], qt.k)
    elems, nbytes = block_size(qt.kind)
    if all(lo % elems == 0 and hi % elems == 0 for lo, hi in ranges):
        data = take([qt.data], 1, [(lo // elems * nbytes, hi // elems * nbytes) for lo, hi in ranges]).contiguous()
        return QuantTensor(qt.kind, data, qt.rows, sum(hi - lo for lo, hi in ranges))
    step = max(1, (1 << 20) // qt.k)  # dequantize a few rows at a time: never the whole matrix in float
    return torch.cat([take([qt.dequantize(dtype, rows=torch.arange(i, min(i + step, qt.rows)))], 1, ranges)
                      for i in range(0, qt.rows, step)])


# ----------------------------------------------------------------------------------------- the transform
def shard_modules(model: Transformer, split: Split) -> Transformer:
    """Resize a model built on the meta device to ``split``'s shapes (before its tensors are assigned)."""
    args, hd, dim = model.args, model.args.head_dim, model.args.dim
    nq, nkv = split.n_heads, split.n_kv_heads
    hidden = split.hidden[1] - split.hidden[0]
    vocab = split.vocab[1] - split.vocab[0]

    def linear(i, o):
        return nn.Linear(i, o, bias=False, device="meta")

    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        a.n_heads, a.n_kv_heads, a.n_rep = nq, nkv, nq // nkv
        a.wq, a.wk, a.wv, a.wo = linear(dim, nq * hd), linear(dim, nkv * hd), linear(dim, nkv * hd), linear(nq * hd, dim)
        f.w1, f.w2, f.w3 = linear(dim, hidden), linear(hidden, dim), linear(dim, hidden)
    model.tok_embeddings = nn.Embedding(vocab, dim, _weight=torch.empty(vocab, dim, device="meta"))
    model.output = linear(dim, vocab)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


@dataclass
class CollectiveStats:
    """What a shard's collectives cost so far: calls, bytes each rank contributed, host seconds spent in
    them (on CUDA, where NCCL runs asynchronously, the time to enqueue unless the caller synchronizes)."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def timed(self, collective, tensor: torch.Tensor, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        collective(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()


def add_collectives(model: Transformer, split: Split, group=None) -> Transformer:
    """Register the hooks that make a shard compute what the whole model does: an all-reduce after each
    row-parallel layer (wo, w2) and the vocabulary-parallel embedding, an all-gather of the logits.
    ``model.tp_stats`` counts them."""
    stats = model.tp_stats = CollectiveStats()
    for layer in model.layers:
        layer.attention.wo.register_forward_hook(_all_reduce_hook(group, stats))
        layer.feed_forward.w2.register_forward_hook(_all_reduce_hook(group, stats))
    emb = model.tok_embeddings
    emb.register_forward_pre_hook(_local_ids_hook(split))
    emb.register_forward_hook(_embedding_sum_hook(group, stats))
    model.output.register_forward_hook(_gather_logits_hook(split, group, stats))
    model.tp_split = split
    return model


def _all_reduce_hook(group, stats: CollectiveStats):
    def hook(module, inputs, out):
        stats.timed(dist.all_reduce, out, out, group=group)  # partial sums of the rank's columns -> the product
        return out

    return hook


def _local_ids_hook(split: Split):
    lo, hi = split.vocab

    def hook(module, inputs):
        (tokens,) = inputs
        outside = (tokens < lo) | (tokens >= hi)
        module.tp_outside = outside  # read by the forward hook right after, in the same call
        return ((tokens - lo).masked_fill(outside, 0),)

    return hook


def _embedding_sum_hook(group, stats: CollectiveStats):
    def hook(module, inputs, out):
        out = out.masked_fill(module.tp_outside[..., None], 0)  # (batch, seq, dim): rows of other ranks' ids are 0
        stats.timed(dist.all_reduce, out, out, group=group)
        return out

    return hook


def _gather_logits_hook(split: Split, group, stats: CollectiveStats):
    width = max(hi - lo for lo, hi in split.vocab_ranges)

    def hook(module, inputs, out):
        # all_gather needs equal sizes: pad each rank's (batch, seq, its ids) to the widest, then trim.
        padded = torch.nn.functional.pad(out, (0, width - out.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in split.vocab_ranges]
        stats.timed(dist.all_gather, padded, parts, padded, group=group)
        return torch.cat([p[..., :hi - lo] for p, (lo, hi) in zip(parts, split.vocab_ranges)], dim=-1)

    return hook


def model_state(model: Transformer) -> dict:
    """A built model's weights by Meta name: tensors, or QuantTensors for block-quantized modules."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            state[name + ".weight"] = module.qtensor
        elif isinstance(module, (nn.Linear, nn.Embedding)) or name.endswith("norm"):
            state[name + ".weight"] = module.weight.detach()
    if model.args.tie_word_embeddings:
        state.pop("output.weight", None)
    return state


def shard_state(state: dict, args: ModelArgs, split: Split, dtype: torch.dtype) -> dict:
    """This rank's slices of a Meta-named state dict (tensors or QuantTensors)."""
    out = {}
    for name, value in state.items():
        spec = tensor_slice(name, args, split)
        if spec is None:
            out[name] = value
        elif isinstance(value, QuantTensor):
            out[name] = slice_blocks(value, *spec, dtype)
        else:
            out[name] = take([value], *spec).contiguous()
    return out


def build_shard(args: ModelArgs, state: dict, split: Split, group=None, device=None, path="<state dict>") -> Transformer:
    """A Transformer holding this rank's ``state`` (already sliced), with its collectives."""
    from ..loading import build_model

    model = shard_modules(Transformer(args, device="meta"), split)
    model = build_model(args, state, device=device, path=path, model=model)
    return add_collectives(model, split, group)


def parallelize(model: Transformer, group=None) -> Transformer:
    """The transform: a built model (every rank holding all of it) -> this rank's shard, its slices
    copied out so that the whole model can be dropped. Rank and world size are ``group``'s."""
    split = plan(model.args, dist.get_world_size(group), dist.get_rank(group))
    state = shard_state(model_state(model), model.args, split, model.norm.weight.dtype)
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    return build_shard(model.args, state, split, group, device=model.norm.weight.device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a model holds (each tensor once; shared ones, as a tied output, counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta or t.data_ptr() in seen or t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
