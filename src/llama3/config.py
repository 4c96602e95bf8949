"""Model hyper-parameters: Meta's ``ModelArgs`` plus what Llama 3.1 and 3.2 added.

The fields and their defaults follow ``llama/model.py`` in meta-llama/llama3 (and
``llama_models/llama3/args.py`` in meta-llama/llama-models for RoPE scaling).
Everything here is plain arithmetic: no torch modules, no files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class ModelArgs:
    """The shape of a Llama model.

    ``n_kv_heads=None`` means as many KV heads as query heads (plain multi-head
    attention). ``ffn_hidden_dim`` is set only when a checkpoint states the FFN
    size (HF ``intermediate_size``, GGUF ``feed_forward_length``); otherwise
    Meta's rule derives it from ``dim``, ``ffn_dim_multiplier`` and ``multiple_of``.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048
    # Llama 3.1 RoPE scaling (Meta's apply_scaling; Hugging Face's rope_type "llama3").
    use_scaled_rope: bool = False
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    # Llama 3.2 1B/3B (and SmolLM2): the output projection is the embedding matrix.
    tie_word_embeddings: bool = False
    # The FFN size when the checkpoint states it; None = Meta's rule (see hidden_dim).
    ffn_hidden_dim: int | None = None
    # Explicit per-band RoPE frequency divisors (a GGUF's rope_freqs tensor); overrides the
    # use_scaled_rope rule when set. head_dim // 2 values.
    rope_freq_divisors: tuple[float, ...] | None = None
    # Where the args came from (a preset's source, a checkpoint path); informational.
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.vocab_size is None or self.vocab_size == -1:
            raise ValueError("vocab_size is unset: set it to the tokenizer's vocabulary size (e.g. 128256 for Llama 3)")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0):
            raise ValueError(f"n_kv_heads must be a positive integer or None, got {self.n_kv_heads!r}")
        if self.ffn_hidden_dim is not None and (not isinstance(self.ffn_hidden_dim, int) or self.ffn_hidden_dim <= 0):
            raise ValueError(f"ffn_hidden_dim must be a positive integer or None, got {self.ffn_hidden_dim!r}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"ffn_dim_multiplier must be positive or None, got {self.ffn_dim_multiplier!r}")
        for name in ("norm_eps", "rope_theta", "rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.rope_original_max_seq_len <= 0:
            raise ValueError(f"rope_original_max_seq_len must be positive, got {self.rope_original_max_seq_len!r}")
        if self.use_scaled_rope and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(
                f"rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                f"rope_low_freq_factor ({self.rope_low_freq_factor})"
            )
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim} = dim / n_heads) must be even for rotary embeddings")
        if self.rope_freq_divisors is not None:
            self.rope_freq_divisors = tuple(float(x) for x in self.rope_freq_divisors)
            if len(self.rope_freq_divisors) != self.head_dim // 2:
                raise ValueError(f"rope_freq_divisors has {len(self.rope_freq_divisors)} values, "
                                 f"expected head_dim / 2 = {self.head_dim // 2}")
            if not all(math.isfinite(x) and x > 0 for x in self.rope_freq_divisors):
                raise ValueError("rope_freq_divisors must be positive and finite")

    # ---------------------------------------------------------------- derived
    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads``, or ``n_heads`` when unset)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head: dim / n_heads."""
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.n_heads // self.kv_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU FFN width.

        Meta's rule: a plain FFN would be 4*dim wide; SwiGLU has three matrices instead of
        two, so take 2/3 of that to keep the parameter count, scale by ffn_dim_multiplier,
        and round up to a multiple of multiple_of (8B: 16384 -> 10922 -> 14198 -> 14336).
        """
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return meta_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def param_counts(self) -> dict[str, int]:
        """Parameters per component; ``output`` is 0 when tied to the embeddings."""
        d, hd = self.dim, self.head_dim
        attention = d * (self.n_heads * hd) + 2 * d * (self.kv_heads * hd) + (self.n_heads * hd) * d
        feed_forward = 3 * d * self.hidden_dim
        return {
            "embeddings": self.vocab_size * d,
            "attention": self.n_layers * attention,
            "feed_forward": self.n_layers * feed_forward,
            "norms": self.n_layers * 2 * d + d,
            "output": 0 if self.tie_word_embeddings else self.vocab_size * d,
        }

    def num_params(self) -> int:
        """Total parameter count (a tied output matrix is counted once)."""
        return sum(self.param_counts().values())

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of K and V stored per token across all layers."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * bytes_per_element

    def replace(self, **changes) -> "ModelArgs":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelArgs":
        """Args of a published Llama 3 model, e.g. ``ModelArgs.from_preset("llama-3.1-8b")``."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        fields = dict(PRESETS[key])
        fields.update(overrides)
        return cls(**fields)


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward size rule (see ``ModelArgs.hidden_dim``)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0)
_LLAMA31_ROPE = dict(use_scaled_rope=True, rope_scale_factor=8.0, rope_low_freq_factor=1.0,
                     rope_high_freq_factor=4.0, rope_original_max_seq_len=8192)
# Llama 3.2 1B/3B were trained with factor 32 (HF config.json and llama-models' converter);
# Meta's reference code hard-codes 8, which is wrong for them (meta-llama/llama-models#166).
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, rope_scale_factor=32.0)

# The published models. Each entry's "source" is the params.json it transcribes.
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(
        _LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
        ffn_dim_multiplier=1.3, max_seq_len=8192,
        source="https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/original/params.json"),
    "llama-3-70b": dict(
        _LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.3, max_seq_len=8192,
        source="https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/original/params.json"),
    "llama-3.1-8b": dict(
        _LLAMA3, **_LLAMA31_ROPE, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
        ffn_dim_multiplier=1.3, max_seq_len=131072,
        source="https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/original/params.json"),
    "llama-3.1-70b": dict(
        _LLAMA3, **_LLAMA31_ROPE, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.3, max_seq_len=131072,
        source="https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/original/params.json"),
    "llama-3.1-405b": dict(
        _LLAMA3, **_LLAMA31_ROPE, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.2, max_seq_len=131072,
        source="https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/original/params.json"),
    "llama-3.2-1b": dict(
        _LLAMA3, **_LLAMA32_ROPE, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
        ffn_dim_multiplier=1.5, max_seq_len=131072, tie_word_embeddings=True,
        source="https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/original/params.json"),
    "llama-3.2-3b": dict(
        _LLAMA3, **_LLAMA32_ROPE, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256,
        ffn_dim_multiplier=1.0, max_seq_len=131072, tie_word_embeddings=True,
        source="https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/original/params.json"),
}
