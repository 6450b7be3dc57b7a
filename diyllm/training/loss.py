"""Re-export: cross-entropy lives in diyllm.model.loss (the model computes its own loss, and model/ imports
nothing from training/). Kept so `from diyllm.training.loss import cross_entropy` keeps working."""

from diyllm.model.loss import cross_entropy

__all__ = ["cross_entropy"]
