"""The engine: decoders over a paged KV cache, and the one continuous-batching loop.

    model ─► Decoder (TorchDecoder = Transformer.forward | CDecoder = the one-call C step
                    | StaticDecoder = the sync-free static-shape step, CUDA graphs on GPUs)
          ─► PagedKVCache (blocks handed out as sequences grow; prefix reuse)
          ─► Engine (add / step / cancel, yielding Step records) ─► Generator, server, bench
"""

from .cache import CacheFull, PagedKVCache, default_kv_dtype
from .decoders import Decoder, TorchDecoder
from .loop import Engine, Request, Step
from .policy import Choice, choose_decoder, choose_prefill_dtype, make_decoder
from .static import StaticDecoder

__all__ = ["CacheFull", "PagedKVCache", "default_kv_dtype", "Decoder", "TorchDecoder", "StaticDecoder", "Engine",
           "Request", "Step", "Choice", "choose_decoder", "choose_prefill_dtype", "make_decoder"]
