"""diyllm: a small, fast, hackable PyTorch stack for training language models from scratch."""

__version__ = "0.1.0"
