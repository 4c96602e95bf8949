"""Tools that show what the model does: a config glossary, a forward-pass trace, the logit lens
and attention maps."""

from .attention import attention_maps, save_attention_pngs
from .glossary import explain
from .lens import logit_lens
from .trace import Trace, stats

__all__ = ["explain", "Trace", "stats", "logit_lens", "attention_maps", "save_attention_pngs"]
