"""What ``llama3 explain --tp N`` shows: how the model splits, and what each rank holds, reads and sends."""

from __future__ import annotations

from ..config import ModelArgs
from .split import describe_split, plan

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def explain_split(args: ModelArgs, world: int, *, batch: int = 1, context: int | None = None,
                  bandwidth_gbs: float = 20.0, interconnect_gbs: float = 50.0, latency_us: float = 10.0) -> dict:
    """Per rank: parameters, weight and KV-cache bytes; per token: bytes all-reduced; and the batch-1 decode
    limit of each rank: (its weight bytes / bandwidth) + (2·n_layers + 1 all-reduces and one all-gather, each
    latency + ring traffic / interconnect)."""
    context = context or args.max_seq_len
    d, hd, layers = args.dim, args.head_dim, args.n_layers
    ranks = []
    for r in range(world):
        s = plan(args, world, r)
        hidden, vocab = s.hidden[1] - s.hidden[0], s.vocab[1] - s.vocab[0]
        attention = layers * (2 * d * s.n_heads * hd + 2 * d * s.n_kv_heads * hd)
        feed_forward = layers * 3 * d * hidden
        embeddings = vocab * d
        output = 0 if args.tie_word_embeddings else vocab * d
        norms = layers * 2 * d + d
        params = attention + feed_forward + embeddings + output + norms
        read = params - (0 if args.tie_word_embeddings else embeddings)  # a decode step reads one embedding row
        kv_token = {k: 2 * layers * s.n_kv_heads * hd * b for k, b in DTYPE_BYTES.items()}
        ranks.append({
            "rank": r, "query_heads": list(range(*s.heads)), "kv_heads": list(s.kv_heads),
            "ffn_columns": list(s.hidden), "vocabulary": list(s.vocab),
            "parameters": {"attention": attention, "feed_forward": feed_forward, "embeddings": embeddings,
                           "output": output, "norms": norms, "total": params},
            "weights_bytes": {k: params * b for k, b in DTYPE_BYTES.items()},
            "read_bytes_per_token": {k: read * b for k, b in DTYPE_BYTES.items()},
            "kv_cache_bytes_per_token": kv_token,
            "kv_cache_bytes": {k: v * batch * context for k, v in kv_token.items()},
        })
    n_reduce = 2 * layers + 1  # wo and w2 in every block, and the embedding
    ring = 2 * (world - 1) / world  # a ring all-reduce sends this many times the message, per rank
    comm = {}
    for k, b in DTYPE_BYTES.items():
        message = d * b  # (1 token, dim) per all-reduce
        gather = args.vocab_size * b * (world - 1) / world
        sent = n_reduce * message * ring + gather
        comm[k] = {"all_reduce_message_bytes": message, "all_reduces_per_token": n_reduce,
                   "bytes_sent_per_rank_per_token": int(sent),
                   "seconds_per_token": n_reduce * latency_us * 1e-6 + latency_us * 1e-6 + sent / (interconnect_gbs * 1e9)}
    slowest = max(ranks, key=lambda x: x["parameters"]["total"])
    limit = {}
    for k in DTYPE_BYTES:
        memory_s = slowest["read_bytes_per_token"][k] / (bandwidth_gbs * 1e9)
        limit[k] = {"memory_seconds": memory_s, "communication_seconds": comm[k]["seconds_per_token"],
                    "tokens_per_s": round(1 / (memory_s + comm[k]["seconds_per_token"]), 1)}
    return {"world": world, "ranks": ranks, "split": describe_split(args, world), "communication": comm,
            "decode_limit": {"bandwidth_gb_per_s": bandwidth_gbs, "interconnect_gb_per_s": interconnect_gbs,
                             "latency_us_per_collective": latency_us, "per_dtype": limit,
                             "arithmetic": "per token: the largest rank's weight bytes / bandwidth, plus "
                                           f"{n_reduce} all-reduces of dim values and one all-gather of the "
                                           "logits, each latency + ring traffic (2(N-1)/N x message) / interconnect"},
            "batch": batch, "context": context}


def format_split(info: dict) -> str:
    from ..explain.glossary import _human_bytes

    lines = ["", f"tensor parallel over {info['world']} ranks"] + ["  " + line for line in info["split"]]
    lines.append(f"  {'rank':<6}{'parameters':>16}{'bf16 weights':>14}{'KV/token bf16':>15}"
                 f"{'KV cache bf16':>15}   (batch {info['batch']} x context {info['context']})")
    for r in info["ranks"]:
        lines.append(f"  {r['rank']:<6}{r['parameters']['total']:>16,}{_human_bytes(r['weights_bytes']['bfloat16']):>14}"
                     f"{_human_bytes(r['kv_cache_bytes_per_token']['bfloat16']):>15}"
                     f"{_human_bytes(r['kv_cache_bytes']['bfloat16']):>15}")
    c = info["communication"]["bfloat16"]
    lines.append(f"  per token: {c['all_reduces_per_token']} all-reduces of {_human_bytes(c['all_reduce_message_bytes'])} "
                 f"(bf16) and an all-gather of the logits; each rank sends {_human_bytes(c['bytes_sent_per_rank_per_token'])}")
    d = info["decode_limit"]
    lines.append(f"  batch-1 decode limit per rank at {d['bandwidth_gb_per_s']} GB/s memory, {d['interconnect_gb_per_s']} "
                 f"GB/s interconnect, {d['latency_us_per_collective']} us per collective:")
    lines.append("    " + ", ".join(f"{k} {v['tokens_per_s']} tok/s (memory {v['memory_seconds'] * 1e3:.2f} ms + "
                                    f"communication {v['communication_seconds'] * 1e3:.2f} ms)"
                                    for k, v in d["per_dtype"].items()))
    lines.append(f"    ({d['arithmetic']})")
    return "\n".join(lines)
