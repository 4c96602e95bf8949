"""Loading real and round-tripped checkpoints of every format.

Tolerances: round trips of float32 weights compare logits at 1e-4 (the same arithmetic on the
same weights; only our loader is in between). Against transformers' GGUF loading of the real
SmolLM2 file, 1e-3: both dequantize the same blocks to float32, and transformers' own noise
between attention kernels is ~5e-5 on logits of magnitude ~20.
"""

import json

import numpy as np
import pytest
import torch

import llama3
from helpers import hf_model, smollm2_path
from llama3 import SamplingParams
from llama3.loading import build_model
from llama3.weights import detect_format, load_checkpoint
from llama3.weights.meta import split_dim

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "1, 2, 3, 4, 5,", "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n"]


def load_model(path):
    ckpt = load_checkpoint(path, quiet=True)
    return ckpt, build_model(ckpt.args, ckpt.state, path=ckpt.path)


# ------------------------------------------------------------------------ the real file
def test_smollm2_config_from_gguf(smollm2):
    a = smollm2.args
    assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.hidden_dim, a.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert a.rope_theta == 100000.0 and a.tie_word_embeddings and a.max_seq_len == 8192
    assert smollm2.model.output.weight is smollm2.model.tok_embeddings.weight
    assert smollm2.format == "gguf" and not smollm2.model.training


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_logits_match_transformers_gguf(smollm2, hf_smollm2, prompt):
    hf, _ = hf_smollm2
    ids = smollm2.tokenizer.encode(prompt, allow_special=True)
    with torch.no_grad():
        ours = smollm2.model(torch.tensor([ids]))[0, -1]
        ref = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_smollm2_greedy_32_tokens_match_transformers(smollm2, hf_smollm2):
    hf, _ = hf_smollm2
    for prompt in PROMPTS[:3]:
        ids = smollm2.tokenizer.encode(prompt)
        steps = smollm2.generator.run([ids], SamplingParams(max_new_tokens=32, temperature=0), stop_ids=set())
        ours = [s.token_id for s in steps]
        seq = list(ids)
        with torch.no_grad():  # transformers' greedy decoding, by hand so that no stop rule interferes
            for _ in range(32):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        assert len(ours) == 32
        assert ours == seq[len(ids):]


def test_default_path_is_the_embedded_model():
    fmt, path = detect_format(smollm2_path())
    assert fmt == "gguf" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("variant, shard", [("gqa2", None), ("gqa2", "20KB"), ("tied", None), ("tied", "20KB"),
                                            ("rope_scaled", "30KB"), ("odd_heads", None)])
def test_hf_round_trip(tmp_path, variant, shard):
    hf = hf_model(variant)
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ckpt, model = load_model(tmp_path)
    assert ckpt.format == "hf"
    assert ckpt.args.tie_word_embeddings == hf.config.tie_word_embeddings
    assert ckpt.args.use_scaled_rope == (variant == "rope_scaled")
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def meta_state_from_hf(hf):
    """A Meta-layout state dict (what Meta's consolidated.00.pth holds) from an HF model."""
    from llama3.weights.hf import args_from_hf_config, hf_state_dict_to_meta

    args = args_from_hf_config(hf.config.to_dict())
    return args, hf_state_dict_to_meta(dict(hf.state_dict()), args)


def save_meta(folder, args, state, n_shards, tied=False):
    """Write params.json + consolidated.NN.pth split the way Meta's model-parallel ranks split them."""
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.kv_heads,
                  vocab_size=args.vocab_size, multiple_of=args.multiple_of, norm_eps=args.norm_eps,
                  rope_theta=args.rope_theta, use_scaled_rope=args.use_scaled_rope)
    if args.use_scaled_rope:
        params["rope_scaling_factor"] = args.rope_scale_factor
    (folder / "params.json").write_text(json.dumps(params))
    for rank in range(n_shards):
        shard = {}
        for name, t in state.items():
            if tied and name == "output.weight":
                continue
            dim = split_dim(name)
            shard[name] = t.clone() if dim is None else t.chunk(n_shards, dim=dim)[rank].clone()
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("variant", ["gqa2", "tied"])
def test_meta_round_trip(tmp_path, n_shards, variant):
    # Meta's params derive the FFN size; pick intermediate_size = Meta's rule for dim 64 (multiple_of 256 -> 256).
    hf = hf_model(variant, intermediate_size=256)
    args, state = meta_state_from_hf(hf)
    save_meta(tmp_path, args, state, n_shards, tied=variant == "tied")
    ckpt, model = load_model(tmp_path)
    assert ckpt.format == "meta" and ckpt.args.hidden_dim == 256
    assert ckpt.args.tie_word_embeddings == (variant == "tied")
    tokens = torch.randint(0, hf.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_meta_original_subfolder_is_found(tmp_path):
    hf = hf_model("gqa2", intermediate_size=256)
    args, state = meta_state_from_hf(hf)
    save_meta(tmp_path / "original", args, state, 1)
    fmt, path = detect_format(tmp_path)
    assert fmt == "meta" and path.name == "original"


def gguf_metadata(args) -> dict:
    """The llama.* keys a converter writes for ``args``: key -> (value, GGUFValueType)."""
    from gguf import GGUFValueType as V

    return {"llama.block_count": (args.n_layers, V.UINT32), "llama.context_length": (args.max_seq_len, V.UINT32),
            "llama.embedding_length": (args.dim, V.UINT32), "llama.feed_forward_length": (args.hidden_dim, V.UINT32),
            "llama.attention.head_count": (args.n_heads, V.UINT32),
            "llama.attention.head_count_kv": (args.kv_heads, V.UINT32),
            "llama.rope.freq_base": (args.rope_theta, V.FLOAT32),
            "llama.attention.layer_norm_rms_epsilon": (args.norm_eps, V.FLOAT32),
            "llama.vocab_size": (args.vocab_size, V.UINT32)}


def write_gguf(path, args, state, qtype_name, tied=False, rope_freqs=None, extra=None, types=None, metadata=None,
               seed=0):
    """A GGUF file written by gguf's own GGUFWriter from a Meta-named state dict. Returns the float32
    tensors the file holds (what a reader must give back).

    ``types``: Meta name -> GGML type, overriding ``qtype_name`` per matrix; kinds gguf-py cannot
    quantize (K-quants, IQ4_*) are written as random blocks (``random_blocks``). ``metadata``: key ->
    (value, GGUFValueType) added or replacing the llama.* defaults, or None to leave a key out.
    ``extra``: key -> string.
    """
    import gguf

    from llama3.weights.gguf import GGUF_TO_META, random_blocks

    meta_to_gguf = {}
    for g, m in GGUF_TO_META.items():
        if "{i}" in g:
            for i in range(args.n_layers):
                meta_to_gguf[m.format(i=i)] = g.format(i=i)
        else:
            meta_to_gguf[m] = g
    w = gguf.GGUFWriter(str(path), "llama")
    keys = gguf_metadata(args)
    keys.update(metadata or {})
    for key, item in keys.items():
        if item is not None:
            w.add_key_value(key, item[0], item[1], sub_type=item[2] if len(item) > 2 else None)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    rng = np.random.default_rng(seed)
    expected = {}
    for name, t in state.items():
        if tied and name == "output.weight":
            continue
        arr = t.float().numpy()
        kind = (types or {}).get(name, qtype_name)
        tt = gguf.GGMLQuantizationType[kind]
        if arr.ndim == 1 or kind == "F32":
            data, tt = arr.astype(np.float32), gguf.GGMLQuantizationType.F32
        elif kind == "F16":
            data = arr.astype(np.float16)
        else:
            try:
                data = gguf.quants.quantize(arr, tt)
            except NotImplementedError:
                data = random_blocks(kind, *arr.shape, rng)
        back = data if tt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
            else gguf.quants.dequantize(data, tt)
        expected[name] = torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(t.shape))
        w.add_tensor(meta_to_gguf[name], data, raw_dtype=tt)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("variant", ["gqa2", "tied"])
def test_gguf_round_trip(tmp_path, qtype, variant):
    hf = hf_model(variant)
    args, state = meta_state_from_hf(hf)
    path = tmp_path / "tiny.gguf"
    expected_state = write_gguf(path, args, state, qtype, tied=variant == "tied")
    ckpt, model = load_model(path)
    assert ckpt.args.tie_word_embeddings == (variant == "tied")
    reference = build_model(args, expected_state)
    tokens = torch.randint(0, args.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-4, rtol=0)
        if qtype == "F32":
            torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_gguf_rope_freqs_tensor_is_used(tmp_path):
    """Llama 3.1 GGUFs carry scaling only as rope_freqs: loading it must equal HF's llama3 rope type."""
    from llama3.model import rope_scaling_divisors, rope_frequencies

    hf = hf_model("rope_scaled")
    args, state = meta_state_from_hf(hf)
    plain = args.replace(use_scaled_rope=False)
    divisors = rope_scaling_divisors(args, rope_frequencies(plain).double())
    path = tmp_path / "scaled.gguf"
    write_gguf(path, plain, state, "F32", rope_freqs=divisors.float().numpy())
    ckpt, model = load_model(path)
    assert ckpt.args.rope_freq_divisors is not None and not ckpt.args.use_scaled_rope
    tokens = torch.randint(0, args.vocab_size, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_load_api_dtype_and_quiet(capfd):
    llm = llama3.load(dtype="bfloat16", quiet=True)
    assert llm.dtype == torch.bfloat16 and llm.args.n_layers == 30
    assert capfd.readouterr().err == ""
