"""Generation: sampling with and without a KV cache, text helpers, the `sample` and `chat` commands."""

from diyllm.generation.generate import ContextFullWarning, DecodeStep, generate, iter_steps, stream
from diyllm.generation.sampling import SamplingParams
from diyllm.generation.text import generate_text, stream_text

__all__ = ["ContextFullWarning", "DecodeStep", "SamplingParams", "generate", "generate_text", "iter_steps", "stream",
           "stream_text"]
