"""Loading a checkpoint: build the model on the meta device, then put each tensor straight in its place.

`path` may be a hub id, a local hub-layout folder (both converted once into a cache, see `cogvlm.hub`) or a converted
folder. No full copy of the model is ever materialised in RAM: safetensors shards are memory-mapped and each tensor
is read onto its target device (a GPU directly, where asked) and cast there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import CONFIG_FILE, CogVLMConfig
from .convert import TOKENIZER_FILE
from .shards import CheckpointError, check_safetensors_headers, list_shards, open_shard, parse_dtype
from .hub import resolve
from .meta import meta_device
from .model import CogVLM
from .quantize import QuantSpec, check_device, pack_model, quantize_model, requested_spec
from .tokenizer import Tokenizer


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere (CPU bf16 matmuls are slow and less accurate)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(path: str | Path, device=None, dtype=None, revision: str | None = None, tokenizer=None,
               device_map=None, max_memory=None, plan_options: dict | None = None,
               prepare: Callable[[CogVLM], None] | None = None, model_class: type[CogVLM] = CogVLM,
               quantize: str | None = None, group_size: int | None = None,
               quantize_vision: bool | None = None) -> CogVLM:
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

    `quantize="int8"|"int4"` quantizes a plain checkpoint while it is read (each weight on its device as it arrives,
    so the full-precision model is never held): int4 in groups of `group_size` inputs (default 128), the ViT too
    unless `quantize_vision=False` (see `cogvlm.quantize`). A checkpoint written by `cogvlm quantize` records its
    quantization and loads quantized without these options.
    """
    path = resolve(path, revision=revision, tokenizer=tokenizer)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) or default_dtype(device)
    meta = json.loads((path / CONFIG_FILE).read_text())
    cfg = CogVLMConfig.from_dict(meta)
    quantization = requested_spec(QuantSpec.from_config(meta), quantize, group_size, quantize_vision)

    def swap_in(model: CogVLM) -> None:  # quantized linears, then the caller's modules; the planner counts them too
        if quantization is not None:
            quantize_model(model, quantization)
        if prepare is not None:
            prepare(model)

    with meta_device():
        model = model_class(cfg, dtype=dtype)
        swap_in(model)
    expected = model.state_dict(keep_vars=True)  # parameters and persistent buffers (quantization scales)
    modules = dict(model.named_modules())
    blocks = None
    if device_map is not None:  # one device per block; "auto"/"balanced" are planned here, before any weight is read
        from .parallel.device_map import apply_device_map, device_for_param
        from .parallel.plan import resolve_device_map

        blocks = resolve_device_map(device_map, cfg, max_memory, dtype=dtype,
                                    prepare=swap_in if quantization or prepare else None, **(plan_options or {}))
    for target in set(blocks.values()) if blocks else [device]:
        check_device(quantization, target, dtype)  # before any weight is read
    shards = list_shards(path)
    check_safetensors_headers(shards)
    loaded: set[str] = set()
    for file, _ in shards:
        with open_shard(file, device="cpu" if blocks else str(device)) as shard:  # with a map: each to its own
            for name in shard.keys():
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r}; checkpoint and code versions differ")
                target = device if blocks is None else device_for_param(blocks, name)
                for key, tensor in _converted(modules, name, shard.get_tensor(name).to(target), file):
                    if tensor.shape != expected[key].shape:
                        raise CheckpointError(
                            f"{file}: {key} has shape {tuple(tensor.shape)}, the config implies "
                            f"{tuple(expected[key].shape)}"
                        )
                    cast = dtype if tensor.is_floating_point() else tensor.dtype  # integers (quantized) as stored
                    set_tensor(model, key, tensor.to(dtype=cast))
                    loaded.add(key)
    missing = sorted(expected.keys() - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensor(s): {', '.join(missing[:10])}")
    tok_file = Path(tokenizer) if tokenizer else path / TOKENIZER_FILE
    if tokenizer and not tok_file.exists():
        raise CheckpointError(f"tokenizer file {tok_file} does not exist")
    model.tokenizer = Tokenizer(tok_file) if tok_file.exists() else None
    if quantization is not None:
        pack_model(model, dtype)  # each quantized layer takes its kernel's layout on its device
    if blocks is not None:
        apply_device_map(model, blocks)  # hooks that move activations to each block's device
    return model.eval()


def _converted(modules: dict[str, nn.Module], name: str, tensor: torch.Tensor, file) -> list[tuple[str, torch.Tensor]]:
    """The tensors to set for one tensor read: a swapped-in module may turn what it reads into its own tensors
    (`convert_loaded`: a quantized linear quantizes a float weight of a plain checkpoint as it arrives)."""
    module_name, _, attr = name.rpartition(".")
    convert = getattr(modules.get(module_name), "convert_loaded", None)
    if convert is None:
        return [(name, tensor)]
    try:
        return [(f"{module_name}.{key}", t) for key, t in convert(attr, tensor)]
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {name}: {e}") from e


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer `name` by `tensor`, without copying."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
