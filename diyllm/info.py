"""Print the versions, the compute device and the thread count diyllm will use."""

from __future__ import annotations

import argparse
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from diyllm import __version__
    from diyllm.training.device import resolve_device

    device = resolve_device("auto")
    print(f"diyllm   {__version__}")
    print(f"python   {platform.python_version()} ({platform.machine()})")
    print(f"torch    {torch.__version__}")
    print(f"numpy    {np.__version__}")
    print(f"device   {device}" + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""))
    print(f"threads  {torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"bf16     {torch.cuda.is_bf16_supported()}")
    return 0
