"""Re-exports: the checkpoint file format moved to diyllm.checkpoints and "load a model from any reference"
to diyllm.loading (neither is training-specific; data, generation and interop use them too). Kept so that
`from diyllm.training.checkpoint import load_model, save_checkpoint, ...` keeps working."""

from diyllm.checkpoints import (
    load_checkpoint,
    model_config_from_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
    tokenizer_from_text,
    unwrap_model,
)
from diyllm.loading import HF_PREFIX, load_model, read_init_checkpoint, read_model_reference

__all__ = ["HF_PREFIX", "load_checkpoint", "load_model", "model_config_from_checkpoint", "model_from_checkpoint",
           "read_checkpoint", "read_init_checkpoint", "read_model_reference", "resolve_checkpoint_path",
           "save_checkpoint", "tokenizer_from_text", "unwrap_model"]
