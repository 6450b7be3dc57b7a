"""The model: a Llama-style transformer built from from-scratch blocks.

Where things are: layers.py (Linear, Embedding, RMSNorm, SiLU, SwiGLU), rope.py (rotary positions),
attention.py (softmax, scaled dot-product attention, causal self-attention, GQA), kv_cache.py,
transformer.py (blocks and DIYForCausalLM), config.py (DIYConfig), loss.py (cross-entropy).
"""

from diyllm.model.config import DIYConfig
from diyllm.model.kv_cache import KVCache
from diyllm.model.transformer import CausalLMOutput, DIYForCausalLM, TransformerBlock

__all__ = ["DIYConfig", "DIYForCausalLM", "TransformerBlock", "KVCache", "CausalLMOutput"]
