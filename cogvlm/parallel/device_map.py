"""Layer-to-device maps (issue 5): which device holds which block, and the hooks that move activations there.

A map places whole *blocks* (`block_names`). Weights load straight to their block's device (`device_for_param`),
a forward pre-hook on every block moves its tensor inputs there (`apply_device_map`), and each decoder layer's KV
cache is allocated on that layer's device (`CogVLM.new_kv_caches`). Maps planned from memory budgets ("auto",
"balanced") come from `cogvlm.parallel.plan`; this module only reads, checks and applies them.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import torch

from ..config import CogVLMConfig
from ..model import CogVLM

STRATEGIES = ("auto", "balanced")  # maps the planner computes (cogvlm.parallel.plan)
SHORT_PREFIXES = ("", "llm.", "vision.")  # "layers.0-15" means llm.layers.0-15; "patch_embed" the vision one
SINKS = ("trace",)  # arguments that collect outputs: a hook must hand the caller's own dict on, never a copy
MAP_HELP = ("give auto, balanced, a JSON object or file, or BLOCK=DEVICE pairs such as "
            "vision=0,layers.0-15=0,layers.16-31=1")


class DeviceMapError(ValueError):
    """A device map naming unknown blocks or devices or leaving some unassigned, or unreadable memory budgets."""


def block_names(cfg: CogVLMConfig) -> list[str]:
    """Every block in forward order, which is also the order the planner fills devices in. Each parameter of the
    model belongs to exactly one block."""
    return (["vision.patch_embed"] + [f"vision.layers.{i}" for i in range(cfg.vision.num_hidden_layers)]
            + ["adapter", "llm.embed"] + [f"llm.layers.{i}" for i in range(cfg.text.num_hidden_layers)]
            + ["llm.norm", "llm.lm_head"])


def to_device(d) -> torch.device:
    """0, "0", "cuda:0" and "cuda" -> cuda:0; "cpu" -> cpu. Says nothing about whether the device exists here
    (a plan may be made for another machine); `check_available` does."""
    if isinstance(d, int) or (isinstance(d, str) and d.strip().isdigit()):
        return torch.device("cuda", int(d))
    try:
        d = torch.device(d.strip() if isinstance(d, str) else d)
    except (RuntimeError, TypeError):
        raise DeviceMapError(f"{d!r} is not a device; write cpu, cuda:N or just N") from None
    return torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d


def check_available(devices, what: str) -> None:
    """Refuse, in one line, devices this machine does not have (before CUDA is touched and fails with a traceback).
    `what` names the input, e.g. "the device map (--device-map)"."""
    cuda = sorted({d.index for d in map(to_device, devices) if d.type == "cuda"})
    if not cuda:
        return
    if not torch.cuda.is_available():
        raise DeviceMapError(f"{what} names cuda:{cuda[0]}, but this machine has no CUDA device "
                             "(torch.cuda.is_available() is False); use cpu instead")
    count = torch.cuda.device_count()
    if cuda[-1] >= count:
        raise DeviceMapError(f"{what} names cuda:{cuda[-1]}, but this machine has {count} CUDA device(s) "
                             f"(cuda:0-{count - 1})")


def block_devices(device_map, cfg: CogVLMConfig) -> dict[str, torch.device]:
    """Normalise a map for this machine to one device per block, in forward order.

    `device_map` is a dict whose keys are blocks, prefixes covering several ("vision", "llm.layers") or ranges
    ("llm.layers.0-15"), short spellings allowed ("layers.0-15", "lm_head"), a narrower key overriding a wider one
    that holds it ({"llm": 1, "lm_head": 0}); or a `Plan` (anything with a `.device_map`). Every device must exist
    here. "auto"/"balanced" are planned by `cogvlm.parallel.plan.resolve_device_map`.
    """
    if isinstance(device_map, str):
        raise DeviceMapError(f"device map {device_map!r}: plan it first (cogvlm.parallel.plan.resolve_device_map) "
                             "or give a dict of block -> device")
    device_map = getattr(device_map, "device_map", device_map)
    if not isinstance(device_map, dict):
        raise DeviceMapError(f"a device map is a dict of block -> device, not {type(device_map).__name__}")
    names = block_names(cfg)
    out: dict[str, torch.device] = {}
    owner: dict[str, set] = {}  # block -> the blocks of the key that placed it
    for key, dev in device_map.items():
        dev, covered = to_device(dev), set(expand(str(key), names))
        for name in covered:
            if name not in owner or covered < owner[name]:  # a narrower key inside a wider one overrides it
                out[name], owner[name] = dev, covered
            elif not owner[name] < covered and out[name] != dev:
                raise DeviceMapError(f"device map puts {name} on both {out[name]} and {dev} (key {key!r})")
    missing = [n for n in names if n not in out]
    if missing:
        raise DeviceMapError(f"device map leaves {len(missing)} block(s) unassigned: {', '.join(compact(missing))}")
    # Inputs (ids, token types, masks) live on the embedding's device, and DecodeSession puts them on the first
    # layer's cache device; the image features are spliced in with masks on that device, so the two must agree.
    if out["llm.embed"] != out["llm.layers.0"]:
        raise DeviceMapError(f"llm.embed ({out['llm.embed']}) and llm.layers.0 ({out['llm.layers.0']}) must share "
                             "a device: the inputs are read there")
    check_available(out.values(), "the device map (--device-map)")
    return {n: out[n] for n in names}


def parse_device_map(text: str):
    """A --device-map value: "auto" or "balanced"; a JSON object or a JSON file; or KEY=DEVICE pairs such as
    "vision=0,adapter=0,embed=0,layers.0-15=0,layers.16-31=1,norm=1,lm_head=1"."""
    text = text.strip()
    if text in STRATEGIES:
        return text
    if text.startswith("{") or text.endswith(".json"):
        return _read_json_map(text)
    pairs = [item.partition("=") for item in filter(None, (s.strip() for s in text.split(",")))]
    if not pairs or any(not sep for _, sep, _ in pairs):
        raise DeviceMapError(f"--device-map: cannot read {text!r}; {MAP_HELP}")
    return {key.strip(): value.strip() for key, _, value in pairs}


def _read_json_map(text: str) -> dict:
    source = "the JSON object" if text.startswith("{") else f"the file {text}"
    try:
        value = json.loads(text if text.startswith("{") else Path(text).read_text())
    except OSError as e:
        raise DeviceMapError(f"--device-map: cannot read the map file {text} ({e.strerror or e}); {MAP_HELP}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeviceMapError(f"--device-map: {source} is not valid JSON ({e}); write e.g. "
                             '{"vision": 0, "layers.0-15": 0, "layers.16-31": 1}') from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, str)) for v in value.values()):
        raise DeviceMapError(f"--device-map: {source} must be a JSON object of block -> device (a number or a "
                             'string such as "cpu"), e.g. {"vision": 0, "layers.16-31": 1}')
    return value


def expand(key: str, names: list[str]) -> list[str]:
    """The blocks a map key covers: a block, a prefix of several, or a range `prefix.a-b` (inclusive). Short
    spellings are tried under "llm." first, then "vision."."""
    rng = re.fullmatch(r"(.+)\.(\d+)-(\d+)", key)
    for prefix in SHORT_PREFIXES:
        if rng:
            base, a, b = prefix + rng[1], int(rng[2]), int(rng[3])
            have = [n for n in names if re.fullmatch(re.escape(base) + r"\.\d+", n)]
            if have:
                wanted = [f"{base}.{i}" for i in range(a, b + 1)]
                if a > b or any(w not in have for w in wanted):
                    raise DeviceMapError(f"range {key!r} is outside {base}.0-{len(have) - 1}")
                return wanted
        else:
            hits = [n for n in names if n == prefix + key or n.startswith(prefix + key + ".")]
            if hits:
                return hits
    raise DeviceMapError(f"unknown block {key!r} in the device map; the blocks are {', '.join(compact(names))} "
                         "(prefixes such as 'vision' and ranges such as 'llm.layers.0-15' work too)")


def compact(names: list[str]) -> list[str]:
    """["llm.layers.0", "llm.layers.1", "llm.norm"] -> ["llm.layers.0-1", "llm.norm"] (readable, and a valid key)."""
    out: list[list] = []  # [base, first, last] for numbered runs, [name] otherwise
    for name in names:
        base, _, idx = name.rpartition(".")
        if idx.isdigit() and out and len(out[-1]) == 3 and out[-1][0] == base and out[-1][2] == int(idx) - 1:
            out[-1][2] = int(idx)
        else:
            out.append([base, int(idx), int(idx)] if idx.isdigit() else [name])
    return [r[0] if len(r) == 1 else f"{r[0]}.{r[1]}" + (f"-{r[2]}" if r[2] > r[1] else "") for r in out]


def device_for_param(device_map: dict, param_name: str) -> torch.device:
    """The device of the block owning `param_name` in a normalised map (`block_devices`, `Plan.device_map`):
    "llm.layers.3.mlp.language_expert.down.weight" -> the device of "llm.layers.3" (longest prefix wins)."""
    parts = param_name.split(".")
    for n in range(len(parts) - 1, 0, -1):
        dev = device_map.get(".".join(parts[:n]))
        if dev is not None:
            return to_device(dev)
    raise DeviceMapError(f"parameter {param_name} belongs to no block of the device map")


# -- execution -----------------------------------------------------------------------------------------------------
def move_to(obj, device: torch.device):
    """`obj` with every tensor in it on `device`, through tuples, lists, dicts and dataclasses (ExpertRoute). A
    container is rebuilt only when something inside moved; anything else (KV caches, None, flags) passes as is."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, (tuple, list)):
        items = [move_to(x, device) for x in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples take *args
    if isinstance(obj, dict):
        items = {k: move_to(v, device) for k, v in obj.items()}
        return obj if all(items[k] is obj[k] for k in obj) else type(obj)(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = {f.name: move_to(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return obj if all(v is getattr(obj, k) for k, v in items.items()) else dataclasses.replace(obj, **items)
    return obj


class MoveInputs:
    """Forward pre-hook moving a block's tensor arguments to the block's device; `calls` counts the forwards seen."""

    def __init__(self, device: torch.device, sink_positions: set[int]):
        self.device, self.sink_positions, self.calls, self.handle = device, sink_positions, 0, None

    def __call__(self, module, args, kwargs):
        self.calls += 1
        args = tuple(a if i in self.sink_positions else move_to(a, self.device) for i, a in enumerate(args))
        return args, {k: v if k in SINKS else move_to(v, self.device) for k, v in kwargs.items()}


def apply_device_map(model: CogVLM, device_map) -> dict[str, MoveInputs]:
    """Put each block on its device (a no-op for blocks the loader already placed) and hook it so that its inputs
    follow; replaces the hooks of an earlier call. `device_map`: a dict or a `Plan` (see `block_devices`). Feed the
    model's inputs on the device of llm.embed."""
    blocks = block_devices(device_map, model.cfg)
    remove_device_map(model)
    hooks = {}
    for name, device in blocks.items():
        module = model.get_submodule(name).to(device)
        sinks = {i for i, p in enumerate(inspect.signature(module.forward).parameters) if p in SINKS}
        hook = hooks[name] = MoveInputs(device, sinks)
        hook.handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    model._device_map_hooks = hooks
    return hooks


def remove_device_map(model: CogVLM) -> None:
    """Take the hooks of `apply_device_map` off again (the weights stay where they are)."""
    for hook in getattr(model, "_device_map_hooks", {}).values():
        hook.handle.remove()
    model._device_map_hooks = {}
