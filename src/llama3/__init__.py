"""llama3: Meta's Llama 3 in readable PyTorch."""

from .config import ModelArgs
from .model import KVCache, Transformer
from .weights.common import CheckpointError

__all__ = ["ModelArgs", "Transformer", "KVCache", "CheckpointError"]
__version__ = "0.1.0"
