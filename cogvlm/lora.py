"""LoRA (low-rank adaptation) as a module swap, and the name patterns used to pick modules and parameters.

`apply_lora(model, targets, rank, alpha, dropout)` replaces each chosen `nn.Linear` by a `LoRALinear`, which
computes `x W^T + b + (alpha / rank) * dropout(x) A^T B^T` with a trainable A (rank x in, Kaiming-uniform) and
B (out x rank, zeros, so a fresh adapter changes nothing). `LoRALinear` is itself an `nn.Linear` that keeps the
wrapped layer's own `weight` and `bias` Parameters, so every original parameter keeps its name and code that reads
`.weight` still works; the adapters add `<module>.lora_A` and `<module>.lora_B`. `merge_lora(model)` folds
`(alpha / rank) B A` into each weight and swaps plain `nn.Linear`s back, so the model's state dict is again exactly
the checkpoint layout.

Patterns (`--lora-targets`, `--train`, `--freeze`) match dotted names, e.g. `llm.layers.3.attn.vision_expert_qkv`:

- a pattern matches a whole run of name components anywhere in the name, and then everything below it:
  `vision_expert_qkv` matches `llm.layers.*.attn.vision_expert_qkv` (and its `.weight`); `mlp.vision_expert`
  matches the visual expert's SwiGLU (`gate_up`, `down`); `adapter` matches every adapter parameter;
- `[a:b]` after a component selects indices as a Python slice (`b` excluded, either end may be left out),
  `[i]` or `[i,j,k]` a list: `vision.layers[46:55].mlp` is the MLPs of ViT layers 46 to 54;
- fnmatch wildcards: `*` matches any run of characters (dots included), `?` one character:
  `llm.layers.*.attn.*_dense`, `*qkv`.

Components are compared whole: `vision` does not match `vision_expert_qkv` (use `vision*` for that).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("vision_expert_qkv", "vision_expert_dense")
_MAX_OPEN_SLICE = 4096  # upper bound for an open-ended slice like `layers[40:]`


# ---------------------------------------------------------------------------------------------------- patterns
@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern:
    """A regex that matches the names `pattern` selects (see the module docstring)."""
    if not pattern or pattern.strip() != pattern:
        raise ValueError(f"empty or space-padded name pattern {pattern!r}")
    body, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            end = pattern.find("]", i)
            if end < 0:
                raise ValueError(f"pattern {pattern!r}: '[' without ']'")
            body.append(r"\." + _index_regex(pattern[i + 1:end], pattern))
            i = end + 1
        elif c == "*":
            body.append(".*")
            i += 1
        elif c == "?":
            body.append(".")
            i += 1
        else:
            body.append(re.escape(c))
            i += 1
    return re.compile(r"(?:^|.*\.)" + "".join(body) + r"(?:\..*)?$", re.DOTALL)


def _index_regex(sel: str, pattern: str) -> str:
    try:
        if ":" in sel:
            a, b = sel.split(":")
            start, stop = int(a) if a else 0, int(b) if b else _MAX_OPEN_SLICE
            indices = range(start, stop)
        else:
            indices = [int(s) for s in sel.split(",")]
    except ValueError:
        raise ValueError(f"pattern {pattern!r}: [{sel}] is not an index selector like [3], [1,4] or [46:55]") from None
    if any(i < 0 for i in indices):
        raise ValueError(f"pattern {pattern!r}: negative indices are not supported")
    if not indices:
        raise ValueError(f"pattern {pattern!r}: [{sel}] selects no index")
    return "(?:" + "|".join(str(i) for i in indices) + ")"


def matches(patterns: str | Iterable[str], name: str) -> bool:
    """Whether `name` is selected by any of `patterns`."""
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(compile_pattern(p).match(name) for p in patterns)


def select(patterns: Sequence[str], names: Iterable[str], what: str = "name") -> list[str]:
    """The names selected by any pattern; a pattern that selects nothing is an error (it is surely a typo)."""
    names = list(names)
    chosen = set()
    for p in patterns:
        rx = compile_pattern(p)
        hit = [n for n in names if rx.match(n)]
        if not hit:
            examples = ", ".join(names[:3] + (["..."] if len(names) > 3 else []))
            raise ValueError(f"pattern {p!r} matches no {what} (names look like: {examples})")
        chosen.update(hit)
    return [n for n in names if n in chosen]


# ------------------------------------------------------------------------------------------------------ modules
class LoRALinear(nn.Linear):
    """An `nn.Linear` plus a low-rank update; holds the wrapped layer's own weight/bias Parameters (no copy)."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: we adopt base's parameters instead of creating new ones
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dtype = dtype or (base.weight.dtype if base.weight.is_floating_point() else torch.float32)
        kw = dict(device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and the LoRA reference
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        a = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            a = a.to(self.lora_A.dtype)
        delta = F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32 update that merging adds to the weight."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear whose weight is W + scaling * B A (computed in fp32), same Parameter objects."""
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Wrap every nn.Linear selected by `targets` in a LoRALinear; returns the wrapped module names.

    The adapters' A and B are trainable (requires_grad=True); nothing else changes its requires_grad. `dtype` is the
    adapters' dtype (default: the wrapped weight's). Each pattern must select at least one linear layer.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora() them first")
    names = select(list(targets), linears, what="linear layer")
    for name in names:
        lora = LoRALinear(model.get_submodule(name), rank, alpha, dropout, dtype)
        lora.lora_A.requires_grad_(True)
        lora.lora_B.requires_grad_(True)
        _set_submodule(model, name, lora)
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRALinear into its weight and swap a plain nn.Linear back; returns the merged module names."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).merged_linear())
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors, by their names in the model (`...vision_expert_qkv.lora_A`, `...lora_B`)."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
