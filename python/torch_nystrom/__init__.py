"""torch-nystrom: Nyström self-attention as LibTorch operators.

Importing this package loads the compiled operator library, which registers
``torch.ops.nystrom.nystrom_attention`` (with autograd),
``torch.ops.nystrom.nystrom_attention_forward`` and
``torch.ops.nystrom.nystrom_attention_backward``.
"""
import os

import torch

from ._version import __version__

# NYSTROM_LIBRARY names another build of the ops to load instead of the one
# shipped here: scripts/test_emulated.sh points it at libnystrom_emulated.so,
# the CUDA backend run on the CPU under the emulation of the CUDA execution
# model (docs/DESIGN.md §11). Only one build of the ops can live in a process.
_LIBRARY = os.environ.get("NYSTROM_LIBRARY") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "libnystrom.so")


def library_path() -> str:
    """Path of the shared library holding the ops.

    A process that runs a TorchScript model using these ops without importing
    this package loads it with ``torch.ops.load_library(library_path())``.
    """
    return _LIBRARY


if not os.path.isfile(_LIBRARY):
    raise ImportError(f"torch_nystrom: the operator library {_LIBRARY} does not exist"
                      + (" (set by NYSTROM_LIBRARY)" if os.environ.get("NYSTROM_LIBRARY") else ""))
torch.ops.load_library(_LIBRARY)


def emulated() -> bool:
    """True when the loaded library is the emulated CUDA backend (tests only)."""
    return hasattr(torch.ops.nystrom, "_emulator")

from .functional import nystrom_attention  # noqa: E402
from .modules import NystromAttention  # noqa: E402
from .hf import swap_nystromformer_attention  # noqa: E402
from .attention import attention_weights  # noqa: E402
from . import onnx  # noqa: E402  (torch_nystrom.onnx.translation_table(); onnxscript is imported on use)
from . import lucidrains  # noqa: E402  (torch_nystrom.lucidrains.NystromAttention)

__all__ = [
    "nystrom_attention", "attention_weights", "NystromAttention", "swap_nystromformer_attention", "lucidrains",
    "onnx", "library_path", "__version__",
]
