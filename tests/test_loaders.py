"""Loading real and round-tripped checkpoints of every format.

Tolerances: round trips of float32 weights compare logits at 1e-4 (the same arithmetic on the
same weights; only our loader is in between). Against transformers' GGUF loading of the real
SmolLM2 file, 1e-3: both dequantize the same blocks to float32, and transformers' own noise
between attention kernels is ~5e-5 on logits of magnitude ~20.
"""

import json
import os

import numpy as np
import pytest
import torch

import llama3
from helpers import hf_model, smollm2_path
from llama3 import SamplingParams
from llama3.kernels import SUPPORTED_KINDS
from llama3.loading import build_model
from llama3.quantize import QuantTensor
from llama3.weights import detect_format, load_checkpoint
from llama3.weights.common import file_ranges, shares_memory, tensors_of
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


# ------------------------------------------------------------------------ read in place, kinds kept
ALL_KINDS = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
             "IQ4_XS"]


def file_kind(qt: QuantTensor) -> str:
    """A QuantTensor's GGML kind."""
    return qt.kind


def in_file(value, path) -> bool:
    """Whether a state-dict value's data lies in a mapping of ``path`` (checked in /proc/self/maps)."""
    return any(shares_memory(value, start, end - start) for start, end in file_ranges(path))


def holds_file_bytes(value, n_bytes: int) -> bool:
    """A QuantTensor holding exactly a file's bytes: its blocks as they are (copied or not), never widened."""
    return isinstance(value, QuantTensor) and sum(t.numel() * t.element_size() for t in tensors_of(value)) == n_bytes


def check_in_place(ckpt, files) -> None:
    """Checkpoint.in_place names exactly the tensors that are views of the checkpoint's files."""
    for name, value in ckpt.state.items():
        assert (name in ckpt.in_place) == any(in_file(value, f) for f in files), name


@pytest.fixture(scope="module")
def tiny256():
    """A tiny model whose rows are multiples of 256, as K-quant blocks need."""
    hf = hf_model("gqa2", hidden_size=256, intermediate_size=512)
    return hf, *meta_state_from_hf(hf)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_gguf_every_kind(tmp_path, tiny256, kind):
    """Every GGUF kind loads. The float path gives gguf-py's dequantization exactly. The default path
    keeps a kind the kernels run in its blocks (the file's bytes, never widened: equal to gguf-py's
    dequantization to float32 rounding); any other kind is dequantized and listed in
    ``Checkpoint.dequantized`` (so that explain can say so)."""
    _, args, state = tiny256
    path = tmp_path / f"{kind}.gguf"
    expected = write_gguf(path, args, state, kind)
    ckpt = load_checkpoint(path, quiet=True)
    assert all(torch.equal(ckpt.state[n], t) for n, t in expected.items()) and ckpt.dequantized == []
    check_in_place(ckpt, [path])
    with torch.no_grad():
        tokens = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(build_model(ckpt.args, ckpt.state)(tokens), build_model(args, expected)(tokens),
                                   atol=0, rtol=0)

    from llama3.weights.gguf import check_header

    infos = {i.name: i for i in check_header(str(path)).tensors.values()}
    fast = load_checkpoint(path, quiet=True, keep=SUPPORTED_KINDS)
    check_in_place(fast, [path])
    matrices = [n for n, t in expected.items() if t.dim() == 2]
    if kind in SUPPORTED_KINDS:
        from llama3.weights.gguf import GGUF_TO_META

        n_bytes = {m: infos[g].n_bytes for g, m in GGUF_TO_META.items() if "{i}" not in g and g in infos}
        n_bytes.update({m.format(i=i): infos[g.format(i=i)].n_bytes for g, m in GGUF_TO_META.items() if "{i}" in g
                        for i in range(args.n_layers)})
        for n in matrices:
            qt = fast.state[n]
            assert holds_file_bytes(qt, n_bytes[n]) and file_kind(qt) == kind, n
            torch.testing.assert_close(qt.dequantize(), expected[n], rtol=1e-6, atol=1e-7)
        assert fast.dequantized == []
    else:
        assert sorted(fast.dequantized) == sorted((n, kind) for n in matrices)
        assert all(torch.equal(fast.state[n], expected[n]) for n in matrices)


def test_gguf_float32_is_read_in_place(tmp_path, tiny):
    _, args, state = tiny
    path = tmp_path / "f32.gguf"
    write_gguf(path, args, state, "F32")
    ckpt = load_checkpoint(path, quiet=True)
    assert ckpt.in_place == set(ckpt.state)  # every tensor a view of the map: nothing copied
    check_in_place(ckpt, [path])


@pytest.fixture(scope="module")
def tiny():
    hf = hf_model("gqa2", intermediate_size=256)  # Meta's FFN rule for dim 64 gives 256
    return hf, *meta_state_from_hf(hf)


@pytest.mark.parametrize("dtype, kind", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_hf_16bit(tmp_path, dtype, kind):
    """A 16-bit HF folder: the float path widens exactly (logits equal transformers' on the same 16-bit
    weights in float32, 1e-4); the default path keeps 16-bit matrices where the kernels run that kind,
    read in place except wq/wk (the HF->Meta row permutation makes a 16-bit copy of each), else
    widens them and lists them in ``dequantized``."""
    hf = hf_model("gqa2").to(dtype)
    hf.save_pretrained(tmp_path)
    ckpt, model = load_model(tmp_path)
    assert all(t.dtype == torch.float32 for t in ckpt.state.values())
    check_in_place(ckpt, list(tmp_path.glob("*.safetensors")))
    tokens = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf.float()(tokens).logits, atol=1e-4, rtol=0)

    fast = load_checkpoint(tmp_path, quiet=True, keep=SUPPORTED_KINDS)
    check_in_place(fast, list(tmp_path.glob("*.safetensors")))
    matrices = [n for n, t in ckpt.state.items() if t.dim() == 2]
    if kind in SUPPORTED_KINDS:
        assert all(isinstance(fast.state[n], QuantTensor) and file_kind(fast.state[n]) == kind for n in matrices)
        assert fast.in_place >= {n for n in matrices if not n.endswith((".wq.weight", ".wk.weight"))}
    else:
        assert sorted(fast.dequantized) == sorted((n, kind) for n in matrices)
    for n in matrices:
        widened = fast.state[n].dequantize() if isinstance(fast.state[n], QuantTensor) else fast.state[n]
        assert torch.equal(widened, ckpt.state[n]), n


def test_hf_float32_is_read_in_place(tmp_path, tiny):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path, quiet=True)
    copied = {n for n in ckpt.state if n.endswith((".wq.weight", ".wk.weight"))}  # the row permutation
    assert ckpt.in_place == set(ckpt.state) - copied
    check_in_place(ckpt, [tmp_path / "model.safetensors"])


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_bf16(tmp_path, tiny, n_shards):
    hf, args, state = tiny
    save_meta(tmp_path, args, {k: v.to(torch.bfloat16) for k, v in state.items()}, n_shards)
    ckpt = load_checkpoint(tmp_path, quiet=True)
    assert all(torch.equal(ckpt.state[k], v.to(torch.bfloat16).float()) for k, v in state.items())
    fast = load_checkpoint(tmp_path, quiet=True, keep=SUPPORTED_KINDS)
    shards = sorted(tmp_path.glob("*.pth"))
    check_in_place(fast, shards)
    matrices = [n for n, t in state.items() if t.dim() == 2]
    if "BF16" in SUPPORTED_KINDS:
        assert all(file_kind(fast.state[n]) == "BF16" for n in matrices)
        assert fast.in_place >= (set(matrices) if n_shards == 1 else set())
    else:
        assert sorted(fast.dequantized) == sorted((n, "BF16") for n in matrices)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
def test_quantize_while_reading(tmp_path, kind):
    """quantize=kind: every matrix is quantized as it is read (the norms stay float32): within the
    kind's rounding of the 16-bit weights (half a step of the block's range, plus float16 scales)."""
    hf = hf_model("gqa2").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ref = load_checkpoint(tmp_path, quiet=True)
    ckpt = load_checkpoint(tmp_path, quiet=True, quantize=kind.lower())
    assert ckpt.in_place == frozenset() and ckpt.dequantized == []
    steps = {"Q8_0": 127, "Q4_1": 15}[kind]
    for name, w in ref.state.items():
        got = ckpt.state[name]
        if w.dim() == 1:
            assert got.dtype == torch.float32 and torch.equal(got, w)
            continue
        assert isinstance(got, QuantTensor) and file_kind(got) == kind
        blocks = w.reshape(w.shape[0], -1, 32)
        step = (blocks.amax(-1) - blocks.amin(-1)) / steps  # the block's quantization step (at most)
        err = (got.dequantize().reshape(blocks.shape) - blocks).abs().amax(-1)
        assert (err <= step * 0.51 + 1e-3 * blocks.abs().amax(-1) + 1e-7).all(), name


def test_quantize_to_the_files_own_kind_keeps_its_blocks(tmp_path, tiny):
    """quantize="Q8_0" on a Q8_0 file: its blocks are taken as they are, not dequantized and rounded again."""
    _, args, state = tiny
    path = tmp_path / "q8.gguf"
    expected = write_gguf(path, args, state, "Q8_0")
    ckpt = load_checkpoint(path, quiet=True, quantize="q8_0")
    for name, t in expected.items():
        if t.dim() == 2:
            assert isinstance(ckpt.state[name], QuantTensor) and file_kind(ckpt.state[name]) == "Q8_0"
            torch.testing.assert_close(ckpt.state[name].dequantize(), t, rtol=1e-6, atol=1e-7)


def test_quantize_names():
    from llama3.loading import check_quantize
    from llama3.quantize import kind_for

    assert check_quantize("auto") is None and check_quantize("none") is None and check_quantize("q4_k") == "q4_k"
    # int8 = Q8_0; int4 = Q4_K with a Q6_K output projection and embedding; rows of 576 are not whole super-blocks
    assert kind_for("int8", "layers.0.attention.wq.weight", 4096) == "Q8_0"
    assert kind_for("int4", "layers.0.attention.wq.weight", 4096) == "Q4_K"
    assert kind_for("int4", "output.weight", 4096) == "Q6_K" and kind_for("int4", "tok_embeddings.weight", 2048) == "Q6_K"
    assert kind_for("int4", "layers.0.attention.wq.weight", 576) == "Q5_0"
    with pytest.raises(ValueError, match="unknown quantize 'q9'; expected one of auto, int8, int4"):
        check_quantize("q9")


def test_no_check_flag():
    from llama3.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "hi"]).check is True
    assert parser.parse_args(["generate", "--no-check", "hi"]).check is False
    assert parser.parse_args(["serve", "--no-check"]).check is False


# ------------------------------------------------------------------------ compact GGUF metadata
def test_gguf_metadata_arrays_equal_gguf_py():
    """The tokenizer arrays of the real file, read compactly, equal gguf-py's reading of them, and
    take about the file's bytes (not ~60 bytes per string as a list would)."""
    from gguf import GGUFReader

    from llama3.weights.gguf import NumberArray, StringArray, check_header

    path = smollm2_path()
    md = check_header(path).metadata
    reader = GGUFReader(path)
    for key, kind in [("tokenizer.ggml.tokens", StringArray), ("tokenizer.ggml.merges", StringArray),
                      ("tokenizer.ggml.token_type", NumberArray)]:
        ours, theirs = md[key], reader.fields[key].contents()
        assert isinstance(ours, kind) and len(ours) == len(theirs) and list(ours) == theirs
        assert ours == theirs and theirs == ours  # both ways round
        field_bytes = sum(int(p.nbytes) for p in reader.fields[key].parts[3:])  # the array's bytes in the file
        assert ours.nbytes <= 2 * field_bytes
    assert md["tokenizer.ggml.bos_token_id"] == reader.fields["tokenizer.ggml.bos_token_id"].contents()


def test_compact_arrays_read_as_sequences():
    from llama3.weights.gguf import NumberArray, StringArray

    strings = ["a", "héllo", "", "z" * 70_000]
    blob = b"".join(len(s.encode()).to_bytes(8, "little") + s.encode() for s in strings)
    starts = np.cumsum([0] + [8 + len(s.encode()) for s in strings])
    arr = StringArray(blob, starts)
    assert len(arr) == 4 and arr[1] == "héllo" and arr[-1] == strings[-1] and arr[1:3] == strings[1:3]
    assert list(arr) == strings and arr == strings and bool(arr) and "héllo" in arr
    with pytest.raises(IndexError):
        arr[4]
    nums = NumberArray(np.arange(5, dtype=np.int32))
    assert nums[2] == 2 and isinstance(nums[2], int) and list(nums) == [0, 1, 2, 3, 4] and nums == range(5)
    assert np.asarray(nums).dtype == np.int32 and list(nums[1:3]) == [1, 2] and nums.index(3) == 3
    assert not NumberArray(np.zeros(0, dtype=np.float32)) and (NumberArray(np.zeros(0)) or [1.0]) == [1.0]
    assert repr(arr) == "StringArray(4 strings, 70039 bytes)" and repr(nums) == "NumberArray(5 x int32)"


def test_tokenizer_from_compact_metadata_equals_from_lists():
    """What the tokenizer reads (tokens, token_type, merges, ids) works from the compact arrays exactly
    as from plain lists."""
    from collections.abc import Sequence

    from llama3.tokenizer import tokenizer_from_gguf
    from llama3.weights.gguf import check_header

    md = check_header(smollm2_path()).metadata
    lists = {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in md.items()}
    compact, plain = tokenizer_from_gguf(md, "smollm2"), tokenizer_from_gguf(lists, "smollm2")
    for text in ["Hello, world!", "def f(x):\n    return x ** 2", "Ünïcödé 日本語 🙂", "<|im_start|>user"]:
        assert compact.encode(text, allow_special=True) == plain.encode(text, allow_special=True)


def test_real_shapes_writes_llama_cpps_type_mix():
    """benchmarks/real_shapes.py gives each tensor the type llama.cpp's quantizer gives it. The counts are
    those of llama-cpp-python 0.3.36's own Q4_K_M / Q4_0 / Q8_0 files of the Llama-3.2-1B shape (made
    from the F16 file; every tensor's type matched one for one)."""
    import collections
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_shapes", os.path.join(os.path.dirname(__file__), "..",
                                                                             "benchmarks", "real_shapes.py"))
    rs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rs)
    args = llama3.ModelArgs.from_preset("llama-3.2-1b")
    plan = rs.gguf_plan(args)
    counts = {ftype: collections.Counter(rs.tensor_type(name, ftype, args.n_layers, args.tie_word_embeddings)
                                         for name, _ in plan) for ftype in ("Q4_K_M", "Q4_0", "Q8_0")}
    assert counts["Q4_K_M"] == {"Q4_K": 96, "F32": 34, "Q6_K": 17}
    assert counts["Q4_0"] == {"Q4_0": 112, "F32": 34, "Q6_K": 1}  # the tied token_embd in Q6_K
    assert counts["Q8_0"] == {"Q8_0": 113, "F32": 34}
    more = [i for i in range(16) if rs.use_more_bits(i, 16)]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]
