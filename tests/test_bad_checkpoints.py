"""Corrupt and hostile checkpoints: each is refused with CheckpointError naming the file, the field and
the value, without running code, hanging, or allocating more than the file's size.

Each refusal is bounded: ``refused`` measures the time, the peak of Python allocations (tracemalloc,
which sees numpy too) and the growth of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs), which sees torch's allocations.
"""

import json
import os
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from gguf import GGUFValueType as V

from helpers import hf_model
from llama3 import CheckpointError
from llama3.kernels import SUPPORTED_KINDS
from llama3.weights import load_checkpoint
from test_loaders import meta_state_from_hf, save_meta, write_gguf

MB = 1 << 20


def _hwm_mb() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
        f.write("5")


def refused(path, *needles, max_alloc=4 * MB, max_rss_mb=64, max_seconds=5.0, **kwargs):
    """Load ``path`` expecting a CheckpointError whose message names the file and holds each needle,
    raised within the time and memory bounds."""
    _reset_hwm()
    base = _hwm_mb()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, quiet=True, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds, rss = time.perf_counter() - start, _hwm_mb() - base
    message = str(e.value)
    assert isinstance(e.value, ValueError)
    assert str(path) in message or os.path.basename(str(path)) in message, message
    for needle in needles:
        assert needle in message, message
    assert peak < max_alloc, f"allocated {peak} bytes"
    assert rss < max_rss_mb, f"peak RSS grew by {rss:.0f} MB"
    assert seconds < max_seconds, f"took {seconds:.1f} s"
    return message


@pytest.fixture(scope="module")
def tiny():
    hf = hf_model("gqa2", intermediate_size=256)  # Meta's FFN rule for dim 64 gives 256
    return hf, *meta_state_from_hf(hf)


@pytest.fixture
def good_gguf(tmp_path, tiny):
    _, args, state = tiny
    path = tmp_path / "good.gguf"
    write_gguf(path, args, state, "F32")
    return path


def test_missing_path(tmp_path):
    refused(tmp_path / "nope.gguf", "no such file or directory")


def test_unknown_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 100)
    refused(tmp_path / "weights.bin", "unknown checkpoint format")
    (tmp_path / "folder").mkdir()
    refused(tmp_path / "folder", "unknown checkpoint format")


# --------------------------------------------------------------------------------- GGUF
def header(version=3, n_tensors=0, kv=b"", n_kv=0):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv


def gguf_string(s: bytes, length=None):
    return struct.pack("<Q", len(s) if length is None else length) + s


def test_gguf_truncated(tmp_path, good_gguf):
    data = good_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) - 100])
    refused(bad, "runs past the end of the file")
    bad.write_bytes(data[:60])
    refused(bad, "metadata count 10 is larger than the file could hold")


def test_gguf_wrong_magic(tmp_path, good_gguf):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + good_gguf.read_bytes()[4:])
    refused(bad, "wrong magic")


def test_gguf_unsupported_version(tmp_path, good_gguf):
    bad = tmp_path / "version.gguf"
    data = bytearray(good_gguf.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    bad.write_bytes(bytes(data))
    refused(bad, "unsupported GGUF version 99")


def test_gguf_tensor_count_too_large(tmp_path):
    bad = tmp_path / "count.gguf"
    bad.write_bytes(header(n_tensors=2**62) + b"\x00" * 64)
    refused(bad, "tensor count 4611686018427387904 is larger than the file could hold", max_alloc=MB)


def test_gguf_string_length_too_large(tmp_path):
    bad = tmp_path / "string.gguf"
    bad.write_bytes(header(n_kv=1, kv=gguf_string(b"general.name", length=2**60)) + b"\x00" * 64)
    refused(bad, "length 1152921504606846976 is larger than the rest of the file", max_alloc=MB)


def test_gguf_array_length_too_large(tmp_path):
    bad = tmp_path / "array.gguf"
    kv = gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40)
    bad.write_bytes(header(n_kv=1, kv=kv) + b"\x00" * 64)
    refused(bad, "array length 1099511627776 is larger than the file could hold", max_alloc=MB)


def test_gguf_tensor_past_the_end(tmp_path):
    bad = tmp_path / "offset.gguf"
    info = gguf_string(b"token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 64, 128) + \
        struct.pack("<IQ", 0, 2**40)
    bad.write_bytes(header(n_tensors=1, kv=info) + b"\x00" * 256)
    refused(bad, "'token_embd.weight'", "runs past the end of the file", max_alloc=MB)


def test_gguf_duplicate_tensor_names(tmp_path):
    bad = tmp_path / "dup.gguf"
    one = gguf_string(b"output_norm.weight") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", 0, 0)
    bad.write_bytes(header(n_tensors=2, kv=one + one) + b"\x00" * 256)
    refused(bad, "duplicate tensor name 'output_norm.weight'")


def test_gguf_unsupported_type_is_named(tmp_path, tiny):
    _, args, state = tiny
    path = tmp_path / "q81.gguf"
    write_gguf(path, args, state, "F32")
    data = bytearray(path.read_bytes())
    # Rewrite the type of the first 2-D tensor to Q8_1 (not dequantizable): find its info record.
    name = b"token_embd.weight"
    at = data.index(gguf_string(name)) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 9)  # GGML type 9 = Q8_1
    path.write_bytes(bytes(data))
    refused(path, "Q8_1")


def test_gguf_not_llama(tmp_path, tiny):
    _, args, state = tiny
    path = tmp_path / "arch.gguf"
    write_gguf(path, args, state, "F32")
    data = path.read_bytes().replace(b"llama.", b"gemma.").replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama",
                                                                    b"\x05\x00\x00\x00\x00\x00\x00\x00gemma")
    path.write_bytes(data)
    refused(path, "general.architecture is 'gemma'")


# --------------------------------------------------------------------------------- safetensors
def test_safetensors_header_longer_than_file(tmp_path, tiny):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    st.write_bytes(bytes(data))
    refused(tmp_path, "model.safetensors", "header length", "larger than the file")


def test_safetensors_truncated(tmp_path, tiny):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    refused(tmp_path, "model.safetensors", "are not within the file's")


def test_hf_tensor_of_wrong_shape(tmp_path, tiny):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    refused(tmp_path, "tensor layers.0.feed_forward.w1.weight has shape (256, 64), expected (100, 64)")


def test_hf_missing_tensor(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    state = load_file(st)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, st, metadata={"format": "pt"})
    refused(tmp_path, "missing tensor(s) ['layers.1.feed_forward.w3.weight']")


def test_hf_index_naming_a_path_outside(tmp_path, tiny):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(tmp_path, "is not a plain file name in this folder")


# --------------------------------------------------------------------------------- Meta .pth
class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LLAMA3_TEST_MARKER']}",))


def test_pth_pickle_that_would_run_code(tmp_path, tiny, monkeypatch):
    _, args, state = tiny
    save_meta(tmp_path, args, state, 1)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LLAMA3_TEST_MARKER", str(marker))
    evil = dict(state)
    evil["layers.0.attention.wq.weight"] = RunsCode()
    torch.save(evil, tmp_path / "consolidated.00.pth")
    refused(tmp_path, "consolidated.00.pth", "refused")
    assert not marker.exists(), "the pickle's code ran"


def test_pth_truncated(tmp_path, tiny):
    _, args, state = tiny
    save_meta(tmp_path, args, state, 1)
    pth = tmp_path / "consolidated.00.pth"
    pth.write_bytes(pth.read_bytes()[:500])
    refused(tmp_path, "consolidated.00.pth", "cannot read checkpoint")


def test_meta_missing_tensor(tmp_path, tiny):
    _, args, state = tiny
    state = {k: v for k, v in state.items() if k != "layers.0.ffn_norm.weight"}
    save_meta(tmp_path, args, state, 1)
    refused(tmp_path, "missing tensor(s) ['layers.0.ffn_norm.weight']")


def test_meta_unknown_params(tmp_path, tiny):
    _, args, state = tiny
    save_meta(tmp_path, args, state, 1)
    params = json.loads((tmp_path / "params.json").read_text())
    params["vision_chunk_size"] = 560
    (tmp_path / "params.json").write_text(json.dumps(params))
    refused(tmp_path, "unknown keys ['vision_chunk_size']")


# ============================================================ stated sizes are checked before use (issue 15)
# --- item 1: a stated layer count is checked against the layers present before it sizes anything
@pytest.mark.parametrize("value, needle", [
    ((2**40, V.UINT64), "metadata llama.block_count is 1099511627776, outside the sane range"),
    ((10**6, V.UINT32), "metadata llama.block_count is 1000000 but the file holds tensors for 2 layer(s)"),
    ((3, V.UINT32), "metadata llama.block_count is 3 but the file holds tensors for 2 layer(s)"),
])
def test_gguf_stated_layer_count(tmp_path, tiny, value, needle):
    _, args, state = tiny
    path = tmp_path / "layers.gguf"
    write_gguf(path, args, state, "F32", metadata={"llama.block_count": value})
    refused(path, needle, max_seconds=2)


def test_gguf_layer_numbers_past_the_count(tmp_path, tiny):
    _, args, state = tiny
    path = tmp_path / "renumbered.gguf"
    write_gguf(path, args, state, "F32")
    data = path.read_bytes().replace(b"blk.1.", b"blk.9.")  # two layers, numbered 0 and 9
    path.write_bytes(data)
    refused(path, "block_count is 2 but the file holds tensors for 2 layer(s), numbered 0 to 9")


def test_hf_stated_layer_count(tmp_path, tiny):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    edit_json(tmp_path / "config.json", num_hidden_layers=10**7)
    refused(tmp_path, "config.json", "num_hidden_layers is 10000000 but the file holds tensors for 2 layer(s)",
            max_seconds=2)


def test_meta_stated_layer_count(tmp_path, tiny):
    _, args, state = tiny
    save_meta(tmp_path, args, state, 1)
    edit_json(tmp_path / "params.json", n_layers=10**7)
    refused(tmp_path, "params.json", "n_layers is 10000000 but the file holds tensors for 2 layer(s)", max_seconds=2)


# --- item 2: the stated context length is a sane positive integer (nothing is sized by it here)
@pytest.mark.parametrize("value, needle", [
    ((2**64 - 1, V.UINT64), "metadata llama.context_length is 18446744073709551615, outside the sane range"),
    ((10**9, V.UINT32), "metadata llama.context_length is 1000000000, outside the sane range"),
    ((0, V.UINT32), "metadata llama.context_length is 0, outside the sane range"),
    ((-5, V.INT32), "metadata llama.context_length is -5, outside the sane range"),
    ((4096.0, V.FLOAT32), "metadata llama.context_length must be an integer, got 4096.0"),
])
def test_gguf_context_length(tmp_path, tiny, value, needle):
    _, args, state = tiny
    path = tmp_path / "ctx.gguf"
    write_gguf(path, args, state, "F32", metadata={"llama.context_length": value})
    refused(path, needle, max_seconds=2)


def test_hf_and_meta_context_length(tmp_path, tiny):
    hf, args, state = tiny
    hf.save_pretrained(tmp_path / "hf")
    for value, needle in [(10**9, "max_position_embeddings is 1000000000, outside"),
                          (2**64 - 1, "max_position_embeddings is 18446744073709551615, outside"),
                          (4096.5, "max_position_embeddings must be an integer, got 4096.5")]:
        edit_json(tmp_path / "hf" / "config.json", max_position_embeddings=value)
        refused(tmp_path / "hf", "config.json", needle, max_seconds=2)
    save_meta(tmp_path / "meta", args, state, 1)
    edit_json(tmp_path / "meta" / "params.json", max_seq_len=10**9)
    refused(tmp_path / "meta", "params.json", "max_seq_len is 1000000000, outside", max_seconds=2)


# --- item 4: wrong-typed or malformed values -> CheckpointError naming the file, the field and the value
@pytest.mark.parametrize("key, value, needle", [
    ("llama.block_count", ("2", V.STRING), "metadata llama.block_count must be an integer, got '2'"),
    ("llama.embedding_length", (64.0, V.FLOAT32), "metadata llama.embedding_length must be an integer, got 64.0"),
    ("llama.attention.head_count", (True, V.BOOL), "metadata llama.attention.head_count must be an integer, got True"),
    ("llama.attention.layer_norm_rms_epsilon", ("1e-5", V.STRING),
     "metadata llama.attention.layer_norm_rms_epsilon must be a finite number, got '1e-5'"),
    ("llama.rope.freq_base", (float("nan"), V.FLOAT32), "metadata llama.rope.freq_base must be a finite number"),
    ("llama.attention.head_count_kv", ([2, 2], V.ARRAY, V.UINT32),
     "metadata llama.attention.head_count_kv must be an integer, got NumberArray(2 x uint32)"),
    ("general.alignment", ("32", V.STRING), "general.alignment '32' is not a power of two"),
    ("general.alignment", (48, V.UINT32), "general.alignment 48 is not a power of two"),
    ("llama.rope.scaling.type", (3, V.UINT32), "metadata llama.rope.scaling.type must be a string, got 3"),
    ("general.architecture", (["llama"], V.ARRAY, V.STRING), "general.architecture is StringArray(1 strings"),
])
def test_gguf_mistyped_metadata(tmp_path, tiny, key, value, needle):
    _, args, state = tiny
    path = tmp_path / "typed.gguf"
    write_gguf(path, args, state, "F32", metadata={key: value})
    refused(path, needle)


TOKENS = [f"t{i}" for i in range(128)]  # the tiny models' vocabulary size


@pytest.mark.parametrize("metadata, needle", [
    ({"tokenizer.ggml.tokens": ([1, 2], V.ARRAY, V.INT32)}, "tokenizer.ggml.tokens must be an array of strings"),
    ({"tokenizer.ggml.tokens": (TOKENS[:100], V.ARRAY, V.STRING)},
     "tokenizer.ggml.tokens has 100 tokens but token_embd has 128 rows"),
    ({"tokenizer.ggml.token_type": ([1] * 127, V.ARRAY, V.INT32)},
     "tokenizer.ggml.token_type must be an array of 128 numbers (one per token), got NumberArray(127 x int32)"),
    ({"tokenizer.ggml.scores": (TOKENS, V.ARRAY, V.STRING)}, "tokenizer.ggml.scores must be an array of 128 numbers"),
    ({"tokenizer.ggml.merges": ([1], V.ARRAY, V.UINT8)}, "tokenizer.ggml.merges must be an array of strings"),
    ({"tokenizer.ggml.bos_token_id": (10**6, V.UINT32)},
     "metadata tokenizer.ggml.bos_token_id is 1000000, outside the sane range [0, 127]"),
    ({"tokenizer.ggml.eos_token_id": ("2", V.STRING)}, "tokenizer.ggml.eos_token_id must be an integer, got '2'"),
    ({"tokenizer.ggml.add_bos_token": (1, V.UINT8)}, "tokenizer.ggml.add_bos_token must be true or false, got 1"),
    ({"tokenizer.chat_template": (7, V.UINT32)}, "tokenizer.chat_template must be a string, got 7"),
])
def test_gguf_mistyped_tokenizer_metadata(tmp_path, tiny, metadata, needle):
    _, args, state = tiny
    path = tmp_path / "tok.gguf"
    metadata = {"tokenizer.ggml.tokens": (TOKENS, V.ARRAY, V.STRING), **metadata}
    write_gguf(path, args, state, "F32", metadata=metadata)
    refused(path, needle)


def test_gguf_token_that_is_not_utf8(tmp_path, tiny):
    """One flipped byte in a token would decode to U+FFFD and collide with other tokens: refused, naming it."""
    _, args, state = tiny
    path = tmp_path / "utf8.gguf"
    write_gguf(path, args, state, "F32", metadata={"tokenizer.ggml.tokens": (TOKENS, V.ARRAY, V.STRING)})
    path.write_bytes(path.read_bytes().replace(b"t77", b"t\xff7"))
    refused(path, "tokenizer.ggml.tokens[77] is not valid UTF-8: b't\\xff7'")


def edit_json(path, **changes):
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("changes, needle", [
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),  # issue 18
    ({"tie_word_embeddings": 0}, "tie_word_embeddings must be true or false, got 0"),
    ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ({"hidden_size": 64.0}, "hidden_size must be an integer, got 64.0"),
    ({"num_key_value_heads": 2.5}, "num_key_value_heads must be an integer, got 2.5"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number, got '1e-5'"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be positive, got -1e-05"),
    ({"vocab_size": -1}, "vocab_size is -1, outside the sane range"),
    ({"rope_scaling": [1, 2]}, "rope_scaling must be an object, got [1, 2]"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4,
                       "original_max_position_embeddings": 8192}}, "rope_scaling.factor must be a finite number, got '8'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8}}, "rope_scaling has no 'low_freq_factor'"),
    ({"attention_bias": "no"}, "attention_bias must be true or false, got 'no'"),
    ({"model_type": ["llama"]}, "model_type must be a string, got ['llama']"),
])
def test_hf_mistyped_config(tmp_path, tiny, changes, needle):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)  # transformers 5 writes its RoPE settings here; test rope_scaling
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    refused(tmp_path, "config.json", needle)


@pytest.mark.parametrize("text, needle", [
    ("[1, 2]", "must hold a JSON object, not list"),
    ("{", "cannot read JSON: JSONDecodeError"),
    ("[" * 100_000 + "]" * 100_000, "cannot read JSON: RecursionError"),
    ('{"hidden_size": 64, "hidden_size": 64}', "key 'hidden_size' appears twice"),
])
def test_hf_malformed_config(tmp_path, tiny, text, needle):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    refused(tmp_path, "config.json", needle)


@pytest.mark.parametrize("changes, needle", [
    ({"dim": "64"}, "dim must be an integer, got '64'"),
    ({"use_scaled_rope": "true"}, "use_scaled_rope must be true or false, got 'true'"),
    ({"norm_eps": None}, "norm_eps must be a finite number, got None"),
    ({"rope_theta": "5e5"}, "rope_theta must be a finite number, got '5e5'"),
    ({"n_heads": 0}, "n_heads is 0, outside the sane range"),
])
def test_meta_mistyped_params(tmp_path, tiny, changes, needle):
    _, args, state = tiny
    save_meta(tmp_path, args, state, 1)
    edit_json(tmp_path / "params.json", **changes)
    refused(tmp_path, "params.json", needle)


# --- item 7: NaN/inf weights are refused at load (for block kinds: in their scales); check=False loads them
def _tensor_bytes(path, gguf_name):
    from llama3.weights.gguf import check_header

    info = check_header(str(path)).tensors[gguf_name]
    return info.offset, info.n_bytes


def _poke(path, offset, raw: bytes):
    data = bytearray(path.read_bytes())
    data[offset:offset + len(raw)] = raw
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tiny256():
    """A tiny model whose rows are multiples of 256, as K-quant blocks need."""
    hf = hf_model("gqa2", hidden_size=256, intermediate_size=512)
    return hf, *meta_state_from_hf(hf)


@pytest.mark.parametrize("kind, where, value", [
    ("F32", "output_norm.weight", struct.pack("<f", float("nan"))),
    ("F16", "blk.1.ffn_up.weight", np.float16(np.inf).tobytes()),
    ("BF16", "blk.0.attn_k.weight", b"\x80\xff"),  # bfloat16 -inf
    ("Q8_0", "blk.0.attn_q.weight", np.float16(np.inf).tobytes()),  # the first block's scale
    ("Q4_1", "token_embd.weight", np.float16(np.nan).tobytes()),
    ("Q4_K", "blk.1.ffn_down.weight", np.float16(np.nan).tobytes()),
    ("Q6_K", "blk.0.attn_output.weight", np.float16(np.inf).tobytes()),
])
def test_gguf_non_finite_weights(tmp_path, tiny256, kind, where, value):
    from llama3.weights.gguf import BLOCK_SCALES

    _, args, state = tiny256
    path = tmp_path / f"nan-{kind}.gguf"
    write_gguf(path, args, state, kind)
    offset, _ = _tensor_bytes(path, where)
    block, fields = BLOCK_SCALES.get(kind, (0, (0,)))
    _poke(path, offset + 3 * block + fields[-1], value)  # the 4th block's last scale (or the first value)
    meta = {"output_norm.weight": "norm.weight", "token_embd.weight": "tok_embeddings.weight"}.get(where)
    # (the tensors before the bad one are read: allow for the 5 MB model's float copies)
    refused(path, f"tensor {meta or ''}", "holds NaN or infinite values", max_alloc=48 * MB, max_rss_mb=128)
    refused(path, "holds NaN or infinite values", keep=SUPPORTED_KINDS, max_alloc=48 * MB, max_rss_mb=128)
    with np.errstate(invalid="ignore"):  # dequantizing an inf scale makes NaNs: that is the point
        ckpt = load_checkpoint(path, quiet=True, check=False)
    assert not torch.isfinite(torch.cat([t.reshape(-1) for t in ckpt.state.values()])).all()


def test_hf_and_meta_non_finite_weights(tmp_path, tiny):
    hf, args, state = tiny
    bf16 = hf_model("gqa2", intermediate_size=256).to(torch.bfloat16)
    with torch.no_grad():
        bf16.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    bf16.save_pretrained(tmp_path / "hf")
    refused(tmp_path / "hf", "tensor layers.1.feed_forward.w2.weight holds NaN or infinite values")
    assert load_checkpoint(tmp_path / "hf", quiet=True, check=False).state["layers.1.feed_forward.w2.weight"].isnan().any()

    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    state["layers.0.attention_norm.weight"][7] = float("inf")
    save_meta(tmp_path / "meta", args, state, 2)
    refused(tmp_path / "meta", "tensor layers.0.attention_norm.weight holds NaN or infinite values")


# --- item 10: Meta shards are checked (extents, then merged shapes) before anything is merged
def _rewrite_shards(folder, edit):
    for path in sorted(folder.glob("consolidated.*.pth")):
        shard = torch.load(path, weights_only=True)
        edit(shard)
        torch.save(shard, path)


@pytest.mark.parametrize("n", [20_000, 100_000])
def test_meta_expanded_views(tmp_path, tiny, n):
    """Two ~10 KB shards holding a stride-0 view of N floats standing for an N x N matrix: merging them
    would allocate 3.2 GB (N = 20000) or ask for 80 GB (N = 100000)."""
    _, args, state = tiny
    save_meta(tmp_path, args, state, 2)
    _rewrite_shards(tmp_path, lambda s: s.update({"layers.0.attention.wq.weight": torch.zeros(n).expand(n, n)}))
    assert all(p.stat().st_size < 1_000_000 for p in tmp_path.glob("*.pth"))
    refused(tmp_path, "consolidated.00.pth", "tensor 'layers.0.attention.wq.weight' is an overlapping or expanded view",
            max_seconds=3)


def test_meta_overlapping_view(tmp_path, tiny):
    _, args, state = tiny
    save_meta(tmp_path, args, state, 1)
    # 64 rows, each starting one element after the last: a (64, 64) view of 127 floats
    _rewrite_shards(tmp_path, lambda s: s.update({
        "layers.1.feed_forward.w2.weight": torch.as_strided(torch.zeros(127), (64, 64), (1, 1))}))
    refused(tmp_path, "is an overlapping or expanded view")


def test_meta_tensors_sharing_one_storage(tmp_path, tiny):
    """Every weight a dense view of one storage: each tensor passes alone, together they stand for
    more bytes than the file holds."""
    _, args, state = tiny
    save_meta(tmp_path, args, state, 1)
    base = torch.zeros(max(t.numel() for t in state.values()))
    _rewrite_shards(tmp_path, lambda s: s.update({k: base[:v.numel()].view(v.shape) for k, v in s.items()}))
    refused(tmp_path, "views that share storage are not a checkpoint")


def test_meta_shard_shapes_checked_before_merging(tmp_path, tiny):
    _, args, state = tiny
    save_meta(tmp_path, args, state, 2)
    path = tmp_path / "consolidated.01.pth"
    shard = torch.load(path, weights_only=True)
    shard["layers.0.attention.wq.weight"] = torch.zeros(32, 65)
    torch.save(shard, path)
    refused(tmp_path, "cannot merge shards of layers.0.attention.wq.weight: shapes [(32, 64), (32, 65)] differ "
                      "outside dimension 0")
    shard["layers.0.attention.wq.weight"] = torch.zeros(8000, 64)  # merges, but not to the configured shape
    torch.save(shard, path)
    refused(tmp_path, "tensor layers.0.attention.wq.weight has shape (8032, 64), expected (64, 64)")


# ============================================================ strict parsing (issue 18)
def _safetensors_with_header(path, header: str, data: bytes):
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_duplicate_tensor_names(tmp_path, tiny):
    """The safetensors library keeps the last of two equal names without a word when their offsets are
    the same; we refuse the file."""
    from safetensors import safe_open

    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].decode().rstrip()
    name = '"model.norm.weight":'
    entry = header[header.index(name):header.index("}", header.index(name)) + 1]
    _safetensors_with_header(st, header[:-1] + "," + entry + "}", data[8 + n:])
    with safe_open(st, framework="pt") as f:  # what the library itself does: one of the two, silently
        assert list(f.keys()).count("model.norm.weight") == 1
    refused(tmp_path, "tensor or field 'model.norm.weight' appears twice in the safetensors header")


@pytest.mark.parametrize("header, needle", [
    ('[1, 2]', "not a JSON object"),
    ('{"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}', "tensor 'a': unknown dtype 'Q4'"),
    ('{"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', "shape must be a list of non-negative integers"),
    ('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', "shape [3] of F32 does not fit data_offsets"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 1099511627776]}}', "are not within the file's 16"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', "tensors 'a' and 'b' overlap in the file"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}', "exactly dtype, shape and data_offsets"),
    ('{"__metadata__": {"format": 1}}', "__metadata__ must map strings to strings"),
    ('{"a":' * 100_000, "invalid safetensors header: RecursionError"),
])
def test_safetensors_malformed_header(tmp_path, tiny, header, needle):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    _safetensors_with_header(tmp_path / "model.safetensors", header, b"\x00" * 16)
    refused(tmp_path, "model.safetensors", needle)


def test_gguf_duplicate_metadata_key(tmp_path, tiny):
    _, args, state = tiny
    path = tmp_path / "dupkey.gguf"
    write_gguf(path, args, state, "F32", extra={"general.aaaa": "x", "general.bbbb": "y"})
    path.write_bytes(path.read_bytes().replace(b"general.bbbb", b"general.aaaa"))
    refused(path, "metadata key 'general.aaaa' appears twice")


def test_gguf_overlapping_tensors(tmp_path):
    bad = tmp_path / "overlap.gguf"
    infos = b"".join(gguf_string(name) + struct.pack("<IQIQ", 1, 64, 0, offset)
                     for name, offset in ((b"a.weight", 0), (b"b.weight", 128)))  # 256 bytes each
    bad.write_bytes(header(n_tensors=2, kv=infos) + b"\x00" * 1024)
    refused(bad, "tensors 'a.weight' and 'b.weight' overlap in the file")


def test_gguf_nested_arrays_are_refused(tmp_path):
    bad = tmp_path / "nested.gguf"
    kv = gguf_string(b"x.nested") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 0)
    bad.write_bytes(header(n_kv=1, kv=kv) + b"\x00" * 64)
    refused(bad, "arrays of arrays are not supported")


@pytest.mark.parametrize("elem", ["uint32", "string"])
def test_gguf_large_metadata_array_is_not_amplified(tmp_path, elem):
    """A 20 MB metadata array cost 342 MB as Python lists; read compactly, it costs about its size."""
    from llama3.weights.gguf import check_header

    n = 5_000_000
    if elem == "uint32":
        payload, count = np.arange(n, dtype=np.uint32).tobytes(), n
        kv = gguf_string(b"x.big") + struct.pack("<IIQ", 9, 4, count) + payload
    else:  # 2.2M one-byte strings: 9 bytes each in the file, ~58 each as a list of str
        count = 20_000_000 // 9
        payload = (struct.pack("<Q", 1) + b"a") * count
        kv = gguf_string(b"x.big") + struct.pack("<IIQ", 9, 8, count) + payload
    path = tmp_path / "big.gguf"
    path.write_bytes(header(n_kv=1, kv=kv) + b"\x00" * 32)
    tracemalloc.start()
    try:
        md = check_header(str(path)).metadata
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(md["x.big"]) == count and md["x.big"][-1] == ("a" if elem == "string" else n - 1)
    assert md["x.big"].nbytes < 1.9 * len(payload)
    assert peak < 2.5 * len(payload), f"{peak / MB:.0f} MB for a {len(payload) / MB:.0f} MB array"


def test_weights_of_a_non_float_dtype(tmp_path, tiny):
    _, args, state = tiny
    save_meta(tmp_path / "meta", args, state, 1)
    _rewrite_shards(tmp_path / "meta", lambda s: s.update({"norm.weight": torch.ones(64, dtype=torch.int64)}))
    refused(tmp_path / "meta", "tensor norm.weight has dtype torch.int64; weights must be float32, float16 or bfloat16")
    hf_model("gqa2").to(torch.float64).save_pretrained(tmp_path / "hf")
    refused(tmp_path / "hf", "has dtype F64; weights must be F32, F16 or BF16")
