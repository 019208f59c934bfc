"""torch-nystrom: Nyström self-attention as LibTorch operators.

Importing this package loads the compiled operator library, which registers
``torch.ops.nystrom.nystrom_attention`` (with autograd),
``torch.ops.nystrom.nystrom_attention_forward`` and
``torch.ops.nystrom.nystrom_attention_backward``.
"""
import os

import torch

from ._version import __version__

_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libnystrom.so")


def library_path() -> str:
    """Path of the shared library holding the ops.

    A process that runs a TorchScript model using these ops without importing
    this package loads it with ``torch.ops.load_library(library_path())``.
    """
    return _LIBRARY


torch.ops.load_library(_LIBRARY)

from .functional import nystrom_attention  # noqa: E402
from .modules import NystromAttention  # noqa: E402
from .hf import swap_nystromformer_attention  # noqa: E402
from .attention import attention_weights  # noqa: E402
from . import onnx  # noqa: E402  (torch_nystrom.onnx.translation_table(); onnxscript is imported on use)
from . import lucidrains  # noqa: E402  (torch_nystrom.lucidrains.NystromAttention)

__all__ = ["nystrom_attention", "attention_weights", "NystromAttention", "swap_nystromformer_attention", "lucidrains", "onnx", "library_path", "__version__"]
