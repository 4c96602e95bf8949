"""Corrupt and hostile checkpoints: each is refused with CheckpointError naming the file and the
problem, without running code, hanging, or allocating more than the file's size."""

import json
import os
import struct
import tracemalloc

import pytest
import torch

from helpers import hf_model
from llama3 import CheckpointError
from llama3.weights import load_checkpoint
from test_loaders import meta_state_from_hf, save_meta, write_gguf


def refused(path, *needles, max_alloc=None):
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, quiet=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert isinstance(e.value, ValueError)
    assert str(path) in message or os.path.basename(str(path)) in message, message
    for needle in needles:
        assert needle in message, message
    if max_alloc is not None:
        assert peak < max_alloc, f"allocated {peak} bytes"
    return message


@pytest.fixture(scope="module")
def tiny():
    hf = hf_model("gqa2")
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
    refused(bad, "tensor count 4611686018427387904 is larger than the file could hold", max_alloc=1 << 20)


def test_gguf_string_length_too_large(tmp_path):
    bad = tmp_path / "string.gguf"
    bad.write_bytes(header(n_kv=1, kv=gguf_string(b"general.name", length=2**60)) + b"\x00" * 64)
    refused(bad, "length 1152921504606846976 is larger than the rest of the file", max_alloc=1 << 20)


def test_gguf_array_length_too_large(tmp_path):
    bad = tmp_path / "array.gguf"
    kv = gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40)
    bad.write_bytes(header(n_kv=1, kv=kv) + b"\x00" * 64)
    refused(bad, "array length 1099511627776 is larger than the file could hold", max_alloc=1 << 20)


def test_gguf_tensor_past_the_end(tmp_path):
    bad = tmp_path / "offset.gguf"
    info = gguf_string(b"token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 64, 128) + \
        struct.pack("<IQ", 0, 2**40)
    bad.write_bytes(header(n_tensors=1, kv=info) + b"\x00" * 256)
    refused(bad, "'token_embd.weight'", "runs past the end of the file", max_alloc=1 << 20)


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
    refused(tmp_path, "model.safetensors", "invalid safetensors file")


def test_hf_tensor_of_wrong_shape(tmp_path, tiny):
    hf, _, _ = tiny
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    refused(tmp_path, "tensor layers.0.feed_forward.w1.weight has shape (128, 64), expected (100, 64)")


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
