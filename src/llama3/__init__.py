"""llama3: Meta's Llama 3 in readable PyTorch.

The names below are imported on first use (PEP 562), so that ``import llama3.cli`` costs nothing and
the command can answer Ctrl-C cleanly even while torch is still being imported.
"""

from importlib import import_module

_EXPORTS = {
    "ModelArgs": ".config", "Transformer": ".model", "KVCache": ".model", "CheckpointError": ".weights.common",
    "load": ".loading", "Llama": ".generation", "Generator": ".generation", "Step": ".generation",
    "GenerationResult": ".generation", "SamplingParams": ".sampling", "Tokenizer": ".tokenizer",
    "load_tokenizer": ".tokenizer",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'llama3' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
