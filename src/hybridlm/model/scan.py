"""Which chunked SSD scan the Mamba layers run: the Triton kernels on CUDA, else PyTorch.

`ssd_triton` (forward + backward kernels) is used for CUDA tensors when triton is
installed; everywhere else, or with ``HYBRIDLM_SSD=pytorch`` in the environment, the
PyTorch `ssd_chunked` runs. Both are tested equal (`tests/model/test_ssd_triton.py`).

Both take ``seq_idx`` (packed documents, `hybridlm.model.documents`); the kernels mask the
decay between documents as `ssd_chunked` does (tested equal in `tests/model/test_documents.py`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch

from .ssd import ssd_chunked


@functools.cache
def _triton_scan() -> Callable | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from .ssd_triton import ssd_triton
    return ssd_triton


def chunked_scan(device: torch.device) -> Callable:
    """The chunked scan for tensors on `device`."""
    if device.type == "cuda" and os.environ.get("HYBRIDLM_SSD", "") != "pytorch":
        return _triton_scan() or ssd_chunked
    return ssd_chunked
