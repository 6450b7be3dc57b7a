"""Interoperability with the Hugging Face Llama format (config.json + safetensors + tokenizer.json).

hf.py reads and writes the folders (export_hf, export_checkpoint, load_hf_model, hf_checkpoint_dict,
import_hf); hf_model.py maps weights and config (incl. the RoPE row permutation); hf_tokenizer.py maps
tokenizers. Neither transformers nor tokenizers is needed at runtime. See docs/interop.md.
"""

from diyllm.interop.hf import export_checkpoint, export_hf, hf_checkpoint_dict, import_hf, load_hf_model

__all__ = ["export_checkpoint", "export_hf", "hf_checkpoint_dict", "import_hf", "load_hf_model"]
