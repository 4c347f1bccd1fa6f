"""Weight-only int8 and int4 linear layers on PyTorch's own kernels (the gpt-fast recipe), and their arithmetic.

The stored format is the same on every device (checkpoints hold it and `state_dict()` gives it back):

    int8  weight int8 (out, in), scales (out,)                     w = code * scale
    int4  weight uint8 (out, in/2), scales, zeros (out, in/group)   w = (code - 8) * scale + zero

- **int8 is symmetric, one scale per output channel** (scale = max|row| / 127, codes -127..127): eight bits leave
  rounding error far below the weights' spread, and with no zero point the product stays `(x @ codes.T) * scales`,
  one matrix product and one multiply.
- **int4 is asymmetric, one scale and one zero per group of `group_size` inputs** (each group's [min, max] is cut
  into 15 steps, codes 0..15): with only 16 levels, fitting each group's actual range instead of a range symmetric
  about 0 spends every level on values that occur (a group whose values are skewed to one side would leave up to
  half the levels empty), and it costs nothing extra: torch's int4 kernel (tinygemm) takes a scale and a zero per
  group in any case, and dequantizes as `(code - 8) * scale + zero` (zero is the value of the middle code 8).
  Two codes share a byte, the even column in the high nibble (the order `_convert_weight_to_int4pack` takes).
- **Scales and zeros are bf16**, the precision tinygemm computes with; codes are computed against the rounded
  scales, so the stored numbers are exactly what every kernel uses and a file and an on-the-fly quantization agree.

Kernels are chosen once the weights sit on their device (`pack_for`), so one file serves the CPU and GPUs:

- int8 on CUDA (bf16/fp16): one row, the fast decode step's product (`cogvlm.decode_kernels.gemv`; in compiled
  code `triton_mm`'s); up to 64 rows, `cogvlm.quantize.triton_mm`'s product on the int8 bytes; more rows (the image
  positions at prefill): its one-pass dequantization (fp32, rounded once), then cuBLAS. Without Triton (or with
  COGVLM_TRITON=0): `F.linear(x, codes.to(x.dtype)) * scales`; torch's `_weight_int8pack_mm` (20x slower than bf16
  on an H200) only on the CPU, for bf16.
- int4, the layers every decode step runs (the language expert): tinygemm, `aten._weight_int4pack_mm` (CUDA, bf16;
  1.6-2.1x faster than bf16 at batch 1 on an H200) or `aten._weight_int4pack_mm_for_cpu` (CPU bf16). tinygemm is
  built for one or two rows: from `Int4Linear.ROWS_OWN[0]` to `[1]` rows a CUDA layer (groups of 128/256) runs
  `cogvlm.quantize.int4_rows` on tinygemm's words; beyond `ROWS_TINYGEMM` rows it dequantizes them into a temporary
  weight (`cogvlm.quantize.tinygemm`) for cuBLAS. The layers only prefill runs (the vision expert, the adapter, the
  ViT) keep the plain layout and dequantize into a temporary weight (`triton_mm` on CUDA, else one compiled kernel)
  for a GEMM. On the CPU in fp32/fp16, whose int4 kernel is slow beyond one row, every layer keeps the plain layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..fusion import fused, fused_kernels
from ..shards import CheckpointError

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what tinygemm supports
SCALE_DTYPE = torch.bfloat16
_TINY = torch.finfo(SCALE_DTYPE).tiny  # the smallest scale: an all-zero row or group gets codes 0
_CHUNK = 1 << 24  # elements quantized at a time, so that quantizing a big matrix needs little temporary memory
_triton_mm = None  # cogvlm.quantize.triton_mm once a CUDA layer first asks for it


def triton_kernels(t: torch.Tensor, dtype: torch.dtype):
    """`cogvlm.quantize.triton_mm` if it serves a tensor on t's device computing in `dtype` (CUDA, bf16/fp16, Triton
    there, COGVLM_TRITON not 0: `triton_mm.enabled`), else None. Imported on first use: it loads Triton and
    registers custom ops, which a CPU run never needs (and `cogvlm ask` on the CPU must not pay for)."""
    global _triton_mm
    if not (t.is_cuda and dtype in (torch.bfloat16, torch.float16)):
        return None
    if _triton_mm is None:
        from . import triton_mm

        _triton_mm = triton_mm
    return _triton_mm if _triton_mm.enabled() else None


# ------------------------------------------------------------------------------------------------- arithmetic
def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """(out, in) float weight -> {"weight": int8 codes (out, in), "scales": bf16 (out,)}, on w's device."""
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=SCALE_DTYPE, device=w.device)
    for rows in _row_chunks(w):
        part = w[rows].float()
        s = (part.abs().amax(dim=1) / 127).clamp(min=_TINY).to(SCALE_DTYPE)
        codes[rows] = torch.round(part / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[rows] = s
    return {"weight": codes, "scales": scales}


def quantize_int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """(out, in) float weight -> {"weight": uint8 (out, in/2) nibbles, "scales", "zeros": bf16 (out, in/group)}."""
    out_features, in_features = w.shape
    check_group_size(group_size, in_features, "this weight")
    groups = in_features // group_size
    nibbles = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_features, groups, dtype=SCALE_DTYPE, device=w.device)
    zeros = torch.empty_like(scales)
    for rows in _row_chunks(w):
        g = w[rows].float().view(-1, groups, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        z = (lo + 8 * (hi - lo) / 15).to(SCALE_DTYPE)  # the value of code 8, rounded first: in a group far from 0
        # its bf16 rounding can exceed a step, so the scale is fitted to the rounded zero, the 16 levels then still
        # spanning [lo, hi]: z - 8 s <= lo and z + 7 s >= hi (up to the scale's own rounding)
        s = torch.maximum((z.float() - lo) / 8, (hi - z.float()) / 7).clamp(min=_TINY).to(SCALE_DTYPE)
        s32, z32 = s.float()[..., None], z.float()[..., None]
        codes = torch.round((g - (z32 - 8 * s32)) / s32).clamp_(0, 15).to(torch.uint8)
        nibbles[rows] = pack_nibbles(codes.view(-1, in_features))
        scales[rows], zeros[rows] = s, z
    return {"weight": nibbles, "scales": scales, "zeros": zeros}


def _row_chunks(w: torch.Tensor):
    step = max(1, _CHUNK // max(1, w.shape[1]))
    return (slice(r, r + step) for r in range(0, w.shape[0], step))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) bytes, the even column in the high nibble."""
    return (codes[:, ::2] << 4) | codes[:, 1::2]


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) uint8 codes 0..15."""
    return torch.stack([nibbles >> 4, nibbles & 15], dim=-1).view(nibbles.shape[0], -1)


@fused(static=(0, 1, 2))  # one kernel on CUDA (in a `fused_kernels()` block), the plain function elsewhere
def dequantize_int4(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype):
    """The (out, in) weight in `dtype`, computed in fp32 and rounded once."""
    codes = torch.stack([nibbles >> 4, nibbles & 15], dim=-1).view(*scales.shape, -1).float()
    w = (codes - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(nibbles.shape[0], -1).to(dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    kernels = triton_kernels(x, x.dtype)
    if kernels is not None and x.numel() == x.shape[-1] and not torch.compiler.is_compiling():
        from ..decode_kernels import gemv  # (device maps, LoRA: 1.14-1.30x triton_mm's one-row product on an H200)
        return gemv(x.reshape(-1).contiguous(), weight, scales, out_dtype=x.dtype).view(*x.shape[:-1], -1)
    if kernels is not None and x.numel() <= kernels.MAX_ROWS * x.shape[-1]:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return kernels.int8_mm(flat, weight, scales).view(*x.shape[:-1], -1)
    if kernels is not None:  # more rows: the weight in x's dtype (one kernel), then cuBLAS with nothing after it
        return F.linear(x, kernels.int8_dequantize(weight, scales, x.dtype))
    return F.linear(x, weight.to(x.dtype)) * scales


class _FrozenProduct(torch.autograd.Function):
    """x @ W.T for a frozen quantized W whose backward (for x only) dequantizes W again rather than keeping it, so that
    training through a quantized base (QLoRA) never holds a full-precision copy of a weight."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None


def check_group_size(group_size: int, in_features: int, where: str) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}")
    if in_features % group_size:
        divisors = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"choose --group-size {' or '.join(map(str, divisors))}" if divisors else "it cannot be int4"
        raise ValueError(f"int4 group size {group_size} does not divide the {in_features} input features of "
                         f"{where}; {hint}, or leave that layer out of the quantized ones")


def int4_kernel(device: torch.device, dtype: torch.dtype, out_features: int) -> str | None:
    """The int4 kernel to pack for ("cuda" or "cpu"), or None to keep the plain layout (see the module docstring)."""
    if dtype != torch.bfloat16 or out_features % 16:  # tinygemm's n-tile: 8 on NVIDIA, 16 on ROCm
        return None
    if device.type == "cuda":
        return "cuda"
    return "cpu" if device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else None


def _tinygemm_words_readable(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `cogvlm.quantize.tinygemm` can dequantize the words of a layer packed for tinygemm on t's device:
    Triton there (`triton_kernels`) and torch's packing as that module reads it (checked once)."""
    if triton_kernels(t, dtype) is None:
        return False
    from .tinygemm import layout_matches

    return layout_matches(t.device)


# ---------------------------------------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: shapes, bias, the loader hook and the stored-format buffers.

    Built on the meta device by the module swap (`cogvlm.quantize.quantize_model`); the loader then fills the buffers,
    either from a quantized checkpoint or by quantizing each float weight as it is read (`convert_loaded`), and calls
    `pack_for(device, dtype)` once everything is in place."""

    mode = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, decode_path: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.decode_path = decode_path  # run by every decode step (the language expert): worth a GEMV kernel
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        for name, (shape, dtype) in self.stored_shapes().items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    def stored_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def convert_loaded(self, attr: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Loader hook: a float `weight` read from a plain checkpoint is quantized on the spot (on the device it was
        read to, so the full-precision model is never held); stored tensors pass through."""
        if attr != "weight" or not tensor.is_floating_point():
            return [(attr, tensor)]
        if tuple(tensor.shape) != (self.out_features, self.in_features):
            raise CheckpointError(f"weight has shape {tuple(tensor.shape)}, the config implies "
                                  f"{(self.out_features, self.in_features)}")
        return list(self.quantize(tensor).items())

    @classmethod
    def from_linear(cls, linear: nn.Linear, decode_path: bool = False, **kw) -> "QuantizedLinear":
        """A quantized copy of `linear` (empty if `linear` is on the meta device); scales in the weight's dtype, as
        the loader casts them to the compute dtype."""
        device, dtype = linear.weight.device, linear.weight.dtype
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, decode_path, device=device, **kw)
        if device.type != "meta":
            with torch.no_grad():
                for name, t in q.quantize(linear.weight.detach()).items():
                    setattr(q, name, t.to(dtype) if t.is_floating_point() else t)
                if linear.bias is not None:
                    q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def pack_for(self, device=None, dtype: torch.dtype | None = None, kernels: bool = True) -> None:
        """Move to `device` (default: where the weights are) and pick the kernel for it and the compute `dtype`
        (`kernels=False`: the plain layout, which training needs: its backward dequantizes)."""
        self.to(torch.device(device) if device is not None else self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenProduct.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.product(x)
        return out if self.bias is None else out + self.bias

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T with the layer's inference kernel (no bias)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight this layer computes with, in `dtype` (default: its scales' dtype)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    mode = "int8"

    def stored_shapes(self):
        return {"weight": ((self.out_features, self.in_features), torch.int8),
                "scales": ((self.out_features,), SCALE_DTYPE)}

    def quantize(self, w):
        return quantize_int8(w)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.scales.dtype == x.dtype:
            flat = x.reshape(-1, self.in_features).contiguous()
            return torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).view(*x.shape[:-1], -1)
        return int8_linear(x, self.weight, self.scales)

    def dequantize(self, dtype=None) -> torch.Tensor:
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype or self.scales.dtype)


class Int4Linear(QuantizedLinear):
    """Plain layout: the stored buffers, dequantized for each product. Kernel layout (after `pack_for` on a
    device/dtype with a fast kernel, decode-path layers only): `packed` in the kernel's own layout and
    `scale_zeros` (in/group, out, 2), which replace the stored buffers (same bytes, never both at once)."""

    mode = "int4"
    # On an H200 (bench/quant_kernels.py, docs/benchmarks.md): from 8 to 64 rows int4_rows multiplies tinygemm's words
    # (four decoder products: 136 us against tinygemm's 140 at 8 rows, 223 against 348 dequantized at 26, 310 against
    # 347 at 64); beyond ROWS_TINYGEMM rows they are dequantized for cuBLAS (0.31-0.71x bf16 at 26-832 rows).
    ROWS_TINYGEMM = 24
    ROWS_OWN = (8, 64)

    def __init__(self, in_features, out_features, bias, decode_path, device=None, group_size: int = 128):
        check_group_size(group_size, in_features, f"a {in_features}->{out_features} linear layer")
        self.group_size = group_size
        super().__init__(in_features, out_features, bias, decode_path, device)
        self.kernel: str | None = None  # "cuda" / "cpu" once packed for that device's kernel
        self.words_readable = False  # tinygemm's words can be dequantized by `cogvlm.quantize.tinygemm` (CUDA)

    def stored_shapes(self):
        groups = (self.out_features, self.in_features // self.group_size)
        return {"weight": ((self.out_features, self.in_features // 2), torch.uint8),
                "scales": (groups, SCALE_DTYPE), "zeros": (groups, SCALE_DTYPE)}

    def quantize(self, w):
        return quantize_int4(w, self.group_size)

    def pack_for(self, device=None, dtype=None, kernels: bool = True) -> None:
        device = torch.device(device) if device is not None else (self.packed if self.kernel else self.weight).device
        dtype = dtype or (self.scale_zeros.dtype if self.kernel else self.scales.dtype)
        kernel = int4_kernel(device, dtype, self.out_features) if self.decode_path and kernels else None
        if self.kernel and (kernel != self.kernel or self.packed.device != device):
            self._unpack()
        self.to(device)
        if kernel and not self.kernel:
            self._pack(kernel, dtype)

    def _pack(self, kernel: str, dtype: torch.dtype) -> None:
        if kernel == "cuda":
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), inner_k_tiles)
            self.words_readable = inner_k_tiles == 8 and _tinygemm_words_readable(self.weight, dtype)
        else:  # the CPU kernel takes one int32 code per element
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.weight).int(), 2)
        scale_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
        for name in ("weight", "scales", "zeros"):
            delattr(self, name)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_zeros", scale_zeros, persistent=False)
        self.kernel = kernel

    def _unpack(self) -> None:
        codes, scale_zeros = self._kernel_codes(), self.scale_zeros
        del self.packed, self.scale_zeros
        self.kernel, self.words_readable = None, False
        self.register_buffer("weight", pack_nibbles(codes))
        self.register_buffer("scales", scale_zeros[..., 0].t().contiguous())
        self.register_buffer("zeros", scale_zeros[..., 1].t().contiguous())

    def _kernel_mm(self, x2d: torch.Tensor, scale_zeros: torch.Tensor, packed=None) -> torch.Tensor:
        op = torch.ops.aten._weight_int4pack_mm if self.kernel == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu
        return op(x2d, self.packed if packed is None else packed, self.group_size, scale_zeros)

    def _kernel_codes(self) -> torch.Tensor:
        """The (out, in) codes back out of the kernel's layout, whatever it is: the kernel applied to rows of the
        identity with scale 1 and zero 8 returns the codes themselves (exact: small integers)."""
        dev = self.packed.device if self.packed.device.type == self.kernel else torch.device(self.kernel)
        packed, dtype, K = self.packed.to(dev), self.scale_zeros.dtype, self.in_features
        unit = torch.tensor([1.0, 8.0], dtype=dtype, device=dev).expand(self.scale_zeros.shape).contiguous()
        parts = []
        for k0 in range(0, K, 512):
            n = min(512, K - k0)
            eye = torch.zeros(n, K, dtype=dtype, device=dev)
            eye[torch.arange(n), torch.arange(k0, k0 + n)] = 1
            parts.append(self._kernel_mm(eye, unit, packed))  # (n, out): rows k0.. of codes.T
        return torch.cat(parts).t().round().to(torch.uint8).to(self.packed.device)

    @property
    def rows_kernel(self) -> bool:
        """Whether `cogvlm.quantize.int4_rows` multiplies this layer's words (readable, groups of whole tiles)."""
        if not self.words_readable:
            return False
        from . import int4_rows  # (Triton is there once the words are readable)
        return int4_rows.supported(self.group_size, self.scale_zeros.dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            return F.linear(x, self.dequantize(x.dtype))
        if x.device.type != self.kernel:
            raise RuntimeError(f"this int4 layer is packed for the {self.kernel} kernel but its input is on "
                               f"{x.device}; call cogvlm.quantize.pack_model(model) after moving the model")
        flat = x.reshape(-1, self.in_features).contiguous()
        rows = flat.shape[0]
        if self.rows_kernel and self.ROWS_OWN[0] <= rows <= self.ROWS_OWN[1]:
            from . import int4_rows
            return int4_rows.int4_rows(flat, self.packed, self.scale_zeros, self.group_size).view(*x.shape[:-1], -1)
        if rows > self.ROWS_TINYGEMM and self.words_readable:
            return F.linear(flat, self._words_dequantized(flat.dtype)).view(*x.shape[:-1], -1)
        return self._kernel_mm(flat, self.scale_zeros).view(*x.shape[:-1], -1)

    def _words_dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        from . import tinygemm  # (imported by `_tinygemm_words_readable` already)

        return tinygemm.dequantize(self.packed, self.scale_zeros, self.group_size, dtype)

    def dequantize(self, dtype=None) -> torch.Tensor:
        if self.kernel is None:
            dtype = dtype or self.scales.dtype
            kernels = triton_kernels(self.weight, dtype)
            if kernels is not None:
                return kernels.int4_dequantize(self.weight, self.scales, self.zeros, dtype)
            with fused_kernels():  # one kernel on CUDA
                return dequantize_int4(self.weight, self.scales, self.zeros, dtype)
        sz = self.scale_zeros
        if self.words_readable:
            return self._words_dequantized(dtype or sz.dtype)
        return dequantize_int4(pack_nibbles(self._kernel_codes()), sz[..., 0].t(), sz[..., 1].t(), dtype or sz.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Always the stored (device-neutral) format, also once packed for a kernel."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel:
            sz = self.scale_zeros
            destination[prefix + "weight"] = pack_nibbles(self._kernel_codes())
            destination[prefix + "scales"] = sz[..., 0].t().contiguous()
            destination[prefix + "zeros"] = sz[..., 1].t().contiguous()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, kernel={self.kernel or 'none (plain)'}"


