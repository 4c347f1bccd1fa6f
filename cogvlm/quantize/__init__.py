"""Weight-only quantization of CogVLM: int8 and int4 linear layers swapped in by name, before any weight is read.

    model = CogVLM.from_pretrained(path, quantize="int4", group_size=128)  # a plain checkpoint, quantized as read
    cogvlm quantize SRC DST --mode int4 --group-size 128                  # once, to a file that then loads as it is

What is quantized (`target_patterns`): in every decoder layer both experts' QKV, dense and SwiGLU matrices, and the
adapter's three matrices; with `quantize_vision` also the ViT's QKV, projection and MLP matrices; and lm_head, in
int8 under both modes (a batch-1 decode step 28 us faster on an H200 and 131 MB less; no change to the tiny-shapes
model's answers: docs/quantize.md). The embeddings, norms, biases, boi/eoi and the ViT's patch convolution stay in the compute
dtype. The layers and their stored format are in `cogvlm.quantize.linear`; streaming a checkpoint into a quantized
one in `cogvlm.quantize.checkpoint`.

A quantized checkpoint is an ordinary converted folder whose `cogvlm_config.json` has a `quantization` entry (mode,
group size, scale dtype, the quantized module names): `load_model` applies the same swap from it, then reads the
stored codes and scales as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..kept import release_session
from ..shards import CheckpointError
from ..swap import replace_modules, set_submodule
from .linear import GROUP_SIZES, MODES, Int4Linear, Int8Linear, QuantizedLinear, check_group_size

__all__ = ["QuantSpec", "quantize_model", "pack_model", "dequantize_model", "check_device", "requested_spec", "weight_bytes",
           "target_patterns", "Int8Linear", "Int4Linear", "QuantizedLinear", "MODES", "GROUP_SIZES"]

DEFAULT_GROUP_SIZE = 128
# The ViT is quantized by default: it is a quarter of the model (4.3 B parameters), without it neither memory target
# is met, and on the tiny-shapes model it moved exact match by at most 0.4 points (docs/quantize.md).
DEFAULT_QUANTIZE_VISION = True
DECODER_TARGETS = ("llm.layers",)  # every nn.Linear in a decoder layer: both experts' qkv, dense, gate_up, down
ADAPTER_TARGETS = ("adapter",)
VISION_TARGETS = ("vision.layers",)  # qkv, proj, fc1, fc2 of each block (not the patch convolution)
LM_HEAD_TARGETS = ("llm.lm_head",)  # int8 under both modes (int4's error there would reach every token's logits)
CONFIG_KEY = "quantization"
FORMAT_VERSION = 1


def target_patterns(mode: str, quantize_vision: bool = DEFAULT_QUANTIZE_VISION) -> list[str]:
    return list(DECODER_TARGETS + ADAPTER_TARGETS + (VISION_TARGETS if quantize_vision else ()) + LM_HEAD_TARGETS)


@dataclass(frozen=True)
class QuantSpec:
    """How a model is quantized. `modules` are the exact module names (known once swapped, recorded in files)."""

    mode: str
    group_size: int | None = None  # int4 only
    quantize_vision: bool = DEFAULT_QUANTIZE_VISION
    modules: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; choose {' or '.join(MODES)}")
        if self.mode == "int8" and self.group_size is not None:
            raise ValueError("int8 has one scale per output channel: a group size applies to int4 only")
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"not {self.group_size}")

    def describe(self) -> str:
        group = f", group size {self.group_size}" if self.group_size else ""
        return f"{self.mode}{group}, ViT {'quantized' if self.quantize_vision else 'not quantized'}"

    def to_config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "mode": self.mode, "group_size": self.group_size,
                "scale_dtype": "bf16", "quantize_vision": self.quantize_vision, "modules": list(self.modules or ())}

    @classmethod
    def from_config(cls, meta: dict) -> "QuantSpec | None":
        """The spec recorded in a checkpoint's config dict (None for a plain checkpoint)."""
        d = meta.get(CONFIG_KEY)
        if d is None:
            return None
        try:
            if d["format_version"] != FORMAT_VERSION or d["scale_dtype"] != "bf16":
                raise CheckpointError(f"quantized checkpoint format {d['format_version']} ({d['scale_dtype']} "
                                      "scales) is not the one this version reads; quantize the original again")
            return cls(d["mode"], d["group_size"], bool(d["quantize_vision"]), tuple(d["modules"]))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"the config's {CONFIG_KEY!r} entry is incomplete ({e!r}); quantize again") from e


def requested_spec(stored: QuantSpec | None, quantize: str | None, group_size: int | None = None,
                   quantize_vision: bool | None = None) -> QuantSpec | None:
    """What to load: the checkpoint's own quantization, or the one asked for (defaults filled in). Asking a quantized
    checkpoint for another quantization is an error: re-quantizing already rounded weights would compound errors."""
    if stored is not None:
        differs = (quantize not in (None, stored.mode) or (group_size is not None and group_size != stored.group_size)
                   or (quantize_vision is not None and quantize_vision != stored.quantize_vision))
        if differs:
            raise CheckpointError(f"this checkpoint is already quantized ({stored.describe()}); load it without "
                                  "quantize options, or quantize the original checkpoint instead")
        return stored
    if quantize is None:
        if group_size is not None or quantize_vision is not None:
            raise ValueError("group_size and quantize_vision apply only with quantize='int8' or 'int4'")
        return None
    if quantize == "int4" and group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    return QuantSpec(quantize, group_size, DEFAULT_QUANTIZE_VISION if quantize_vision is None else quantize_vision)


def quantize_model(model: nn.Module, spec: QuantSpec) -> QuantSpec:
    """Swap the chosen `nn.Linear`s for quantized ones; returns the spec with the module names filled in (also kept as
    `model.quantization`). On the meta device (before loading) the new layers are empty and the loader fills them;
    on a real model each weight is quantized now (then call `pack_model`)."""
    patterns = list(spec.modules) if spec.modules else target_patterns(spec.mode, spec.quantize_vision)

    def make(name: str, linear: nn.Module) -> QuantizedLinear:
        # The language expert runs in every decode step (decode tokens are text); the rest only at prefill.
        decode_path = any(part.startswith("language_expert") for part in name.split("."))
        if spec.mode == "int8" or name in LM_HEAD_TARGETS:
            return Int8Linear.from_linear(linear, decode_path=decode_path)
        check_group_size(spec.group_size, linear.in_features, name)
        return Int4Linear.from_linear(linear, decode_path=decode_path, group_size=spec.group_size)

    names = replace_modules(model, patterns, make, what="linear layer to quantize")
    if spec.modules and tuple(names) != tuple(spec.modules):
        missing = sorted(set(spec.modules) - set(names))
        raise CheckpointError(f"the checkpoint's config names quantized modules this model does not have as linear "
                              f"layers: {', '.join(missing[:5])}")
    spec = replace(spec, modules=tuple(names))
    model.quantization = spec
    return spec


def pack_model(model: nn.Module, dtype: torch.dtype | None = None, kernels: bool = True) -> None:
    """Give every quantized layer the kernel layout for the device it is on (after loading or moving the model);
    `kernels=False` gives them all the plain layout, which training through them needs."""
    dtype = dtype or getattr(model, "dtype", None)
    release_session(model)  # a kept decode graph would still read the old layout
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.pack_for(None, dtype, kernels)


def dequantize_model(model: nn.Module) -> list[str]:
    """Swap every quantized layer back for an `nn.Linear` holding its dequantized weight, in the model's compute
    dtype (e.g. to export a model fine-tuned on a quantized base); returns the names."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    dtype = getattr(model, "dtype", None)
    for name in names:
        q = model.get_submodule(name)
        w = q.dequantize(dtype)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:
            linear.bias = nn.Parameter(q.bias.detach().to(w.dtype), requires_grad=False)
        set_submodule(model, name, linear)
    model.__dict__.pop("quantization", None)
    return names


def check_device(spec: QuantSpec | None, device, dtype: torch.dtype) -> None:
    """Fail before any weight is read when `device` cannot run `spec` (int4 needs torch's int4 kernels)."""
    if spec is None or spec.mode != "int4":
        return
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f"int4 has no kernel on {device.type} devices (torch's int4 kernels run on CUDA GPUs and "
                         "the CPU); use int8 there")
    if torch.torch_version.TorchVersion(torch.__version__) < "2.5":
        raise ValueError(f"int4 on CUDA needs torch >= 2.5 (this is {torch.__version__}); upgrade, or use int8")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        raise ValueError(f"int4 on CUDA needs a GPU of compute capability 8.0 (Ampere) or newer for torch's int4 "
                         f"kernel; {device} is {major}.{minor}: use int8")
    if dtype != torch.bfloat16:
        raise ValueError(f"int4 on CUDA computes in bf16 (torch's int4 kernel); load with dtype bf16, not {dtype}")


def weight_bytes(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the model's parameters and persistent buffers once loaded in compute `dtype` (floating tensors,
    quantization scales included, are cast to it; integer ones stay as stored). Works on the meta model."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
               for t in model.state_dict(keep_vars=True).values())
