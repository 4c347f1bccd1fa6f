"""Loading a checkpoint: build the model on the meta device, then put each tensor straight in its place.

`path` may be a hub id, a local hub-layout folder (both converted once into a cache, see `cogvlm.hub`) or a converted
folder. No full copy of the model is ever materialised in RAM: safetensors shards are memory-mapped and each tensor
is read onto its target device (a GPU directly, where asked) and cast there.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import CONFIG_FILE, CogVLMConfig
from .convert import TOKENIZER_FILE
from .shards import CheckpointError, check_safetensors_headers, list_shards, open_shard, parse_dtype
from .hub import resolve
from .model import CogVLM
from .tokenizer import Tokenizer


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere (CPU bf16 matmuls are slow and less accurate)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(path: str | Path, device=None, dtype=None, revision: str | None = None, tokenizer=None,
               device_map=None, max_memory=None, plan_options: dict | None = None,
               prepare: Callable[[CogVLM], None] | None = None, model_class: type[CogVLM] = CogVLM) -> CogVLM:
    """A `CogVLM` with the weights of `path` (hub id, hub-layout or converted folder), in eval mode, gradients off.

    `revision`: the hub branch, tag or commit (default main). `tokenizer`: a tokenizer.model to use (and to store in
    a new conversion); by default the checkpoint's own. The model gets `model.tokenizer` (None when there is none).
    `device_map` spreads whole blocks over devices (see `cogvlm.parallel`: a dict, "auto" or "balanced" with
    `max_memory` budgets); it is planned before any weight is read, and each weight goes straight to its block's
    device; `plan_options` (batch_size, context) size the KV cache that "auto"/"balanced" reserve (default batch 1,
    full context). Strict: every parameter must be in the checkpoint with its exact shape, and nothing else may be.

    `prepare(model)`, if given, runs on the meta-device model before any tensor is read: the seam where modules are
    swapped in from outside (quantized or tensor-parallel linears, see `cogvlm.swap`), after which the checkpoint must
    hold the swapped model's tensors. Floating-point tensors are cast to `dtype`; integer tensors (quantized weights)
    are loaded as they are stored. `model_class` is the class built (the convenience API's subclass by default there).
    """
    path = resolve(path, revision=revision, tokenizer=tokenizer)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) or default_dtype(device)
    cfg = CogVLMConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    with meta_device():
        model = model_class(cfg, dtype=dtype)
        if prepare is not None:
            prepare(model)
    expected = model.state_dict(keep_vars=True)  # parameters and persistent buffers (quantization scales)
    blocks = None
    if device_map is not None:  # one device per block; "auto"/"balanced" are planned here, before any weight is read
        from .parallel.device_map import apply_device_map, device_for_param
        from .parallel.plan import resolve_device_map

        blocks = resolve_device_map(device_map, cfg, max_memory, dtype=dtype, prepare=prepare, **(plan_options or {}))
    shards = list_shards(path)
    check_safetensors_headers(shards)
    loaded: set[str] = set()
    for file, _ in shards:
        with open_shard(file, device="cpu" if blocks else str(device)) as shard:  # with a map: each to its own
            for name in shard.keys():
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r}; checkpoint and code versions differ")
                tensor = shard.get_tensor(name)
                if tensor.shape != expected[name].shape:
                    raise CheckpointError(
                        f"{file}: {name} has shape {tuple(tensor.shape)}, the config implies "
                        f"{tuple(expected[name].shape)}"
                    )
                target = device if blocks is None else device_for_param(blocks, name)
                cast = dtype if tensor.is_floating_point() else tensor.dtype  # integers (quantized) stay as stored
                set_tensor(model, name, tensor.to(device=target, dtype=cast))
                loaded.add(name)
    missing = sorted(expected.keys() - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensor(s): {', '.join(missing[:10])}")
    tok_file = Path(tokenizer) if tokenizer else path / TOKENIZER_FILE
    if tokenizer and not tok_file.exists():
        raise CheckpointError(f"tokenizer file {tok_file} does not exist")
    model.tokenizer = Tokenizer(tok_file) if tok_file.exists() else None
    if blocks is not None:
        apply_device_map(model, blocks)  # hooks that move activations to each block's device
    return model.eval()


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


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer `name` by `tensor`, without copying."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
