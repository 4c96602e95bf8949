import pytest

from llama3 import ModelArgs
from llama3.config import PRESETS


@pytest.mark.parametrize("name, hidden, params", [
    ("llama-3-8b", 14336, 8_030_261_248),
    ("llama-3.1-8b", 14336, 8_030_261_248),
    ("llama-3-70b", 28672, 70_553_706_496),
    ("llama-3.1-70b", 28672, 70_553_706_496),
    ("llama-3.1-405b", 53248, 405_853_388_800),
    ("llama-3.2-1b", 8192, 1_235_814_400),
    ("llama-3.2-3b", 8192, 3_212_749_824),
])
def test_presets_match_published_sizes(name, hidden, params):
    args = ModelArgs.from_preset(name)
    assert args.hidden_dim == hidden
    assert args.num_params() == params
    assert args.source.startswith("https://")


def test_preset_details():
    a = ModelArgs.from_preset("llama-3.1-8b")
    assert (a.head_dim, a.n_rep, a.kv_heads) == (128, 4, 8)
    assert a.use_scaled_rope and a.rope_scale_factor == 8
    assert ModelArgs.from_preset("llama-3.2-1b").rope_scale_factor == 32
    assert ModelArgs.from_preset("llama-3.2-1b").tie_word_embeddings
    assert not ModelArgs.from_preset("llama-3-8b").use_scaled_rope
    assert set(PRESETS) == {"llama-3-8b", "llama-3-70b", "llama-3.1-8b", "llama-3.1-70b",
                            "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b"}


def test_meta_ffn_rule_steps():
    # 8B: 4*4096 = 16384 -> int(2/3) = 10922 -> *1.3 = 14198 -> round up to 1024 -> 14336
    assert ModelArgs(dim=4096, vocab_size=10, multiple_of=1024, ffn_dim_multiplier=1.3).hidden_dim == 14336
    assert ModelArgs(dim=64, n_heads=4, vocab_size=10, multiple_of=32).hidden_dim == 192  # 170 -> 192
    assert ModelArgs(dim=64, n_heads=4, vocab_size=10, ffn_hidden_dim=100).hidden_dim == 100


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=100, n_heads=3, vocab_size=10), "dim (100) is not divisible by n_heads (3)"),
    (dict(dim=64, n_heads=4, n_kv_heads=3, vocab_size=10), "n_heads (4) is not divisible by n_kv_heads (3)"),
    (dict(dim=64, n_heads=4), "vocab_size is unset"),
    (dict(dim=0, n_heads=4, vocab_size=10), "dim must be a positive integer, got 0"),
    (dict(dim=64, n_heads=4, n_layers=-1, vocab_size=10), "n_layers must be a positive integer, got -1"),
    (dict(dim=64, n_heads=4, vocab_size=10, max_seq_len=0), "max_seq_len must be a positive integer, got 0"),
    (dict(dim=64, n_heads=4, n_kv_heads=0, vocab_size=10), "n_kv_heads must be a positive integer or None, got 0"),
    (dict(dim=64, n_heads=4, vocab_size=10, norm_eps=-1.0), "norm_eps must be a positive number, got -1.0"),
    (dict(dim=12, n_heads=4, vocab_size=10), "head_dim (3 = dim / n_heads) must be even"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        ModelArgs(**kwargs)
    assert message in str(e.value)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError) as e:
        ModelArgs.from_preset("llama-4-9000b")
    assert "llama-4-9000b" in str(e.value) and "llama-3.1-8b" in str(e.value) and "llama-3.2-3b" in str(e.value)
