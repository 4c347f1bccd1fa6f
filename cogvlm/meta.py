"""Building a model on the meta device, whose tensors are filled in afterwards (by the loader, a planner's byte count,
a conversion's shape table): no memory, and no initialisation either."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode


class _SkipMetaInit(TorchFunctionMode):
    """Skips `torch.nn.init` functions on meta tensors. Their values are never read, and a random fill of a meta
    tensor runs a Python decomposition that imports torch._dynamo: 2-3 s of a small model's start-up."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__module__", None) == "torch.nn.init" and getattr(tensor, "is_meta", False):
            return tensor
        return func(*args, **kwargs)


@contextmanager
def meta_device():
    """`with torch.device("meta")` for building a model whose tensors are filled in afterwards, without its init."""
    with torch.device("meta"), _SkipMetaInit():
        yield
