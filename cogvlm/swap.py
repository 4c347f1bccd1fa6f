"""Choosing modules by name pattern and replacing them: the one seam through which LoRA, quantization and tensor
parallelism change a model from outside, so that the model files only ever know `nn.Linear`.

    select(patterns, names)                      names chosen by any pattern (a pattern choosing none is an error)
    replace_modules(model, patterns, make, kind)  swap each chosen module of type `kind` for `make(name, module)`

Patterns (`--lora-targets`, `--train`, `--freeze`, quantization targets) match dotted names, e.g. `llm.layers.3.attn.vision_expert_qkv`:

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
import re
from typing import Callable, Iterable, Sequence

from torch import nn

from .kept import release_session

_MAX_OPEN_SLICE = 4096  # upper bound for an open-ended slice like `layers[40:]`


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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    # A decode session kept on the model (cogvlm.generate.session_for) and its vision graphs may hold CUDA graphs
    # recorded with the old module's kernels: drop them, the next call records new ones.
    release_session(model)


def replace_modules(model: nn.Module, patterns: Sequence[str], make: Callable[[str, nn.Module], nn.Module],
                    kind: type | tuple[type, ...] = nn.Linear, what: str = "linear layer") -> list[str]:
    """Replace every module of type `kind` whose name a pattern selects by `make(name, old_module)`; returns the
    replaced names in model order. Works on a meta-device model too (before any weight is read)."""
    candidates = [n for n, m in model.named_modules() if isinstance(m, kind)]
    names = select(list(patterns), candidates, what=what)
    for name in names:
        set_submodule(model, name, make(name, model.get_submodule(name)))
    return names
