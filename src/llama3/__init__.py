"""llama3: Meta's Llama 3 in readable PyTorch."""

from .config import ModelArgs
from .generation import GenerationResult, Generator, Llama, Step
from .loading import load
from .model import KVCache, Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer
from .weights.common import CheckpointError

__all__ = ["ModelArgs", "Transformer", "KVCache", "CheckpointError", "load", "Llama", "Generator", "Step",
           "GenerationResult", "SamplingParams", "Tokenizer", "load_tokenizer"]
__version__ = "0.1.0"
