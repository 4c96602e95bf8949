"""explain, trace, logit lens and attention maps."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llama3.model import no_tap

from helpers import smollm2_path
from llama3 import ModelArgs
from llama3.explain import Trace, attention_maps, explain, logit_lens, save_attention_pngs
from llama3.explain.glossary import checkpoint_param_counts, resolve

PUBLISHED = {"llama-3-8b": 8_030_261_248, "llama-3.1-405b": 405_853_388_800, "llama-3.2-1b": 1_235_814_400,
             "llama-3.2-3b": 3_212_749_824, "llama-3.1-70b": 70_553_706_496}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_explain_presets_give_published_counts(name):
    info = explain(ModelArgs.from_preset(name))
    assert info["parameters"]["total"] == PUBLISHED[name]
    assert sum(v for k, v in info["parameters"].items() if k not in ("total", "tied")) == PUBLISHED[name]


def test_explain_smollm2_counts_equal_its_tensors(smollm2):
    args, shapes, _ = resolve(smollm2_path())
    info = explain(args, tensor_counts=checkpoint_param_counts(shapes))
    real = sum(p.numel() for p in smollm2.model.parameters())  # the tied matrix counted once
    assert info["parameters"]["total"] == real == info["parameters"]["from_checkpoint_tensors"]["total"]
    for part in ("embeddings", "attention", "feed_forward", "norms", "output"):
        assert info["parameters"][part] == info["parameters"]["from_checkpoint_tensors"][part]


def test_explain_derivations():
    info = explain(ModelArgs.from_preset("llama-3-8b"), batch=1, context=8192, bandwidth_gbs=100)
    d = info["derived"]
    assert d["head_dim"]["value"] == 128 and d["queries_per_kv_head"]["value"] == 4
    assert d["ffn_hidden_dim"]["arithmetic"] == ("4*dim = 16384; int(2/3 of it) = 10922; x ffn_dim_multiplier 1.3 "
                                                 "= 14198; rounded up to a multiple of 1024 = 14336")
    assert info["memory"]["kv_cache_bytes_per_token"]["bfloat16"] == 2 * 32 * 8 * 128 * 2
    assert info["memory"]["kv_cache"]["bytes"]["bfloat16"] == 131072 * 8192
    untied_read = 8_030_261_248 - 128256 * 4096  # the embedding table is read one row at a time
    assert info["decode_speed_limit"]["bytes_read_per_token"]["bfloat16"] == untied_read * 2
    scaled = explain(ModelArgs.from_preset("llama-3.1-8b"))["derived"]["rope"]
    assert scaled["scaled"] and scaled["max_divisor"] == 8.0
    assert scaled["bands_unchanged"] + scaled["bands_blended"] + scaled["bands_fully_scaled"] == 64
    assert scaled["bands_unchanged"] > 0 and scaled["bands_fully_scaled"] > 0 and scaled["bands_blended"] > 0


def test_explain_json_has_every_field():
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "explain", "llama-3.2-1b", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    import dataclasses

    assert set(info["fields"]) == {f.name for f in dataclasses.fields(ModelArgs)}
    assert all(f["meaning"] for f in info["fields"].values())
    assert {"derived", "parameters", "memory", "compute", "decode_speed_limit"} <= set(info)


def test_explain_text_and_compare():
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "explain", "--compare", "llama-3.2-1b", "llama-3-8b"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "1,235,814,400" in out.stdout and "8,030,261,248" in out.stdout
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "explain"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "134,515,008" in out.stdout and "head_dim" in out.stdout
    import llama3

    assert f"runs as: {llama3.load(quiet=True).describe()}" in out.stdout  # the engine policy's own words
    assert "runs as: quantized Q4_1/Q8_0 weights" in out.stdout and "one C call per decode step" in out.stdout
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "explain", "llama-9"], capture_output=True, text=True)
    assert out.returncode == 2 and "neither a checkpoint path nor a preset" in out.stderr and "llama-3.2-1b" in out.stderr


@pytest.fixture(scope="module")
def prompt_tokens(smollm2):
    return torch.tensor([smollm2.encode_prompt("The capital of France is Paris, and the capital of Italy is")])


def test_trace_logits_equal_forward(smollm2, prompt_tokens):
    model = smollm2.model
    with torch.no_grad():
        plain = model(prompt_tokens)
        with Trace(model, layers=[0, -1]) as t:
            traced = model(prompt_tokens)
    assert torch.equal(plain, traced) and torch.equal(t.records["logits"], plain)
    n = prompt_tokens.shape[1]
    last = model.n_layers - 1
    for name in ("embeddings", "layers.0.attention_norm", "layers.0.attention.q_rope", "layers.0.attention.probs",
                 f"layers.{last}.feed_forward.silu_gate_x_up", f"layers.{last}.residual_ffn", "norm"):
        assert name in t.records, name
    assert "layers.5.attention.q" not in t.records
    assert t.records["layers.0.attention.q"].shape == (1, n, 9, 64)
    assert t.records["layers.0.attention.k"].shape == (1, n, 3, 64)  # 3 KV heads for 9 query heads
    probs = t.records["layers.0.attention.probs"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 9, n), atol=1e-5, rtol=0)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    assert (probs[..., upper] == 0).all()
    torch.testing.assert_close(t.records["layers.0.attention.probs"].flatten(0, 1) @
                               t.records["layers.0.attention.v"][0].transpose(0, 1).repeat_interleave(3, 0),
                               t.records["layers.0.attention.heads_concat"][0].view(n, 9, 64).transpose(0, 1),
                               atol=1e-4, rtol=0)


def test_no_tap_remains_even_after_an_exception(smollm2):
    model = smollm2.model
    with pytest.raises(IndexError):
        with Trace(model):
            model(torch.tensor([[10 ** 9]]))  # out of vocabulary: the embedding lookup raises mid-forward
    modules = [model, *model.layers] + [b.attention for b in model.layers] + [b.feed_forward for b in model.layers]
    assert all(m.tap is no_tap for m in modules)
    with Trace(model, layers=[1]):
        pass
    assert all(m.tap is no_tap for m in modules)


def test_lens_last_layer_equals_model_prediction(smollm2, prompt_tokens):
    rows = logit_lens(smollm2.model, prompt_tokens, top_k=3)
    assert len(rows) == smollm2.model.n_layers + 1 and rows[0].layer == "embeddings"
    with torch.no_grad():
        probs = torch.softmax(smollm2.model(prompt_tokens)[0, -1], dim=-1)
    top = torch.topk(probs, 3)
    assert rows[-1].token_ids == top.indices.tolist()
    assert rows[-1].probs == pytest.approx(top.values.tolist(), abs=1e-5)
    every = logit_lens(smollm2.model, prompt_tokens, top_k=1, positions=list(range(prompt_tokens.shape[1])))
    assert len(every) == (smollm2.model.n_layers + 1) * prompt_tokens.shape[1]


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _not_blank(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.std() > 0.05


@pytest.mark.parametrize("n_tokens", [5, 100])
def test_attention_pngs(smollm2, tmp_path, n_tokens):
    ids = (smollm2.encode_prompt("The quick brown fox jumps over the lazy dog. " * 12))[:n_tokens]
    probs = attention_maps(smollm2.model, torch.tensor([ids]), layer=2)
    assert probs.shape == (9, n_tokens, n_tokens)
    written = save_attention_pngs(probs, [smollm2.tokenizer.decode([i]) for i in ids], str(tmp_path), 2)
    pngs = [p for p in written if p.endswith(".png")]
    assert len(pngs) == 10  # 9 heads + the grid
    w, h = _png_size(str(tmp_path / "layer2_head0.png"))
    assert w == h and 500 <= w <= 2000
    assert all(_not_blank(p) for p in pngs)
    assert np.array_equal(np.load(tmp_path / "layer2.npy"), probs)


def test_lens_and_attention_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "lens", "--all-positions", "--out", str(tmp_path),
                          "The capital of France is"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "embeddings" in out.stdout and _not_blank(str(tmp_path / "lens.png"))
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "attention", "--layer", "-1", "--head", "4", "--out",
                          str(tmp_path), "Hello world"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "layer29_head4.png").exists() and not (tmp_path / "layer29_heads.png").exists()
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "attention", "--layer", "30", "--out", str(tmp_path),
                          "Hello"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--layer 30 does not exist" in out.stderr
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "trace", "--layers", "0,-1", "Hello world"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "layers.29.feed_forward.silu_gate_x_up" in out.stdout
