"""Spreading CogVLM over several devices (issue 5): a layer-to-device map, written by hand or planned from memory
budgets, and the hooks that move activations to where each block lives.

A map places whole *blocks* (`block_names`). Weights load straight to their block's device (`device_for_param`),
a forward pre-hook on every block moves its tensor inputs there (`apply_device_map`), and each decoder layer's KV
cache is allocated on that layer's device (`CogVLM.new_kv_caches`). The planner (`plan`) works from the config's
tensor shapes alone, so a map that cannot fit is refused before any weight is read.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import operator
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate

import torch

from .config import CogVLMConfig
from .shards import DTYPES
from .model import CogVLM

GiB = 2**30
UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "kib": 2**10, "kb": 10**3, "b": 1, "": 1}
STRATEGIES = ("auto", "balanced")
SHORT_PREFIXES = ("", "llm.", "vision.")  # "layers.0-15" means llm.layers.0-15; "patch_embed" the vision one
SINKS = ("trace",)  # arguments that collect outputs: a hook must hand the caller's own dict on, never a copy


class DeviceMapError(ValueError):
    """A device map naming unknown blocks or leaving some unassigned, or unreadable memory budgets."""


class DoesNotFitError(DeviceMapError):
    """The blocks cannot be placed within the budgets; `needed` and `available` are in bytes."""

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed, self.available = needed, available


# -- maps written by hand ------------------------------------------------------------------------------------------
def block_names(cfg: CogVLMConfig) -> list[str]:
    """Every block in forward order, which is also the order the planner fills devices in. Each parameter of the
    model belongs to exactly one block."""
    return (["vision.patch_embed"] + [f"vision.layers.{i}" for i in range(cfg.vision.num_hidden_layers)]
            + ["adapter", "llm.embed"] + [f"llm.layers.{i}" for i in range(cfg.text.num_hidden_layers)]
            + ["llm.norm", "llm.lm_head"])


def to_device(d) -> torch.device:
    """0, "0", "cuda:0" and "cuda" -> cuda:0; "cpu" -> cpu."""
    if isinstance(d, int) or (isinstance(d, str) and d.strip().isdigit()):
        return torch.device("cuda", int(d))
    try:
        d = torch.device(d.strip() if isinstance(d, str) else d)
    except (RuntimeError, TypeError):
        raise DeviceMapError(f"{d!r} is not a device; write cpu, cuda:N or just N") from None
    return torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d


def block_devices(device_map, cfg: CogVLMConfig, max_memory=None, **plan_options) -> dict[str, torch.device]:
    """Normalise a map to one device per block, in forward order.

    `device_map` is a dict whose keys are blocks, prefixes covering several ("vision", "llm.layers") or ranges
    ("llm.layers.0-15"), short spellings allowed ("layers.0-15", "lm_head"), a narrower key overriding a wider one
    that holds it ({"llm": 1, "lm_head": 0}); or a `Plan`; or "auto"/"balanced",
    planned from `max_memory` (default: `default_max_memory()`) with `plan_options` (batch_size, context, dtype).
    """
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise DeviceMapError(f"device_map {device_map!r}: give a dict of block -> device, 'auto' or 'balanced'")
        device_map = plan(cfg, max_memory or default_max_memory(), strategy=device_map, **plan_options)
    if isinstance(device_map, Plan):
        device_map = device_map.device_map
    names = block_names(cfg)
    out: dict[str, torch.device] = {}
    owner: dict[str, set] = {}  # block -> the blocks of the key that placed it
    for key, dev in device_map.items():
        dev, covered = to_device(dev), set(_expand(str(key), names))
        for name in covered:
            if name not in owner or covered < owner[name]:  # a narrower key inside a wider one overrides it
                out[name], owner[name] = dev, covered
            elif not owner[name] < covered and out[name] != dev:
                raise DeviceMapError(f"device map puts {name} on both {out[name]} and {dev} (key {key!r})")
    missing = [n for n in names if n not in out]
    if missing:
        raise DeviceMapError(f"device map leaves {len(missing)} block(s) unassigned: {', '.join(_compact(missing))}")
    # Inputs (ids, token types, masks) live on the embedding's device, and DecodeSession puts them on the first
    # layer's cache device; the image features are spliced in with masks on that device, so the two must agree.
    if out["llm.embed"] != out["llm.layers.0"]:
        raise DeviceMapError(f"llm.embed ({out['llm.embed']}) and llm.layers.0 ({out['llm.layers.0']}) must share "
                             "a device: the inputs are read there")
    return {n: out[n] for n in names}


def parse_device_map(text: str):
    """A --device-map value: "auto" or "balanced"; a JSON object or a JSON file; or KEY=DEVICE pairs such as
    "vision=0,adapter=0,embed=0,layers.0-15=0,layers.16-31=1,norm=1,lm_head=1"."""
    text = text.strip()
    if text in STRATEGIES:
        return text
    if text.startswith("{") or text.endswith(".json"):
        return json.loads(text if text.startswith("{") else open(text).read())
    pairs = [item.partition("=") for item in filter(None, (s.strip() for s in text.split(",")))]
    if not pairs or any(not sep for _, sep, _ in pairs):
        raise DeviceMapError(f"cannot read the device map {text!r}; give auto, balanced, a JSON object or file, or "
                             "BLOCK=DEVICE pairs such as vision=0,layers.0-15=0,layers.16-31=1")
    return {key.strip(): value.strip() for key, _, value in pairs}


def _expand(key: str, names: list[str]) -> list[str]:
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
    raise DeviceMapError(f"unknown block {key!r} in the device map; the blocks are {', '.join(_compact(names))} "
                         "(prefixes such as 'vision' and ranges such as 'llm.layers.0-15' work too)")


def _compact(names: list[str]) -> list[str]:
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
    follow; replaces the hooks of an earlier call. Feed the model's inputs on the device of llm.embed."""
    blocks = block_devices(device_map, model.cfg, dtype=next(model.parameters()).dtype)  # dtype: for "auto"
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


# -- planning ------------------------------------------------------------------------------------------------------
def parse_size(text) -> int:
    """20GiB, 20 GB, 512MiB, 512MB, 1024 (bytes) -> bytes. GiB/MiB are powers of 2, GB/MB powers of 10."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in UNITS:
        raise DeviceMapError(f"cannot read the size {text!r}; write e.g. 20GiB, 20GB, 512MiB or 512MB")
    return int(float(m[1]) * UNITS[m[2].lower()])


def parse_max_memory(text: str) -> dict[str, int]:
    """"0=20GiB,1=20GiB,cpu=60GiB" -> {"cuda:0": bytes, "cuda:1": bytes, "cpu": bytes}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise DeviceMapError(f"cannot read {item!r} in the memory budgets; write DEVICE=SIZE pairs such as "
                                 "0=20GiB,1=20GiB,cpu=60GiB")
        out[str(to_device(key))] = parse_size(value)
    if not out:
        raise DeviceMapError("no memory budgets given; write e.g. 0=20GiB,1=20GiB,cpu=60GiB")
    return out


def default_max_memory(fraction: float = 0.9) -> dict[str, int]:
    """90% of each GPU's free memory (the rest for the CUDA context and fragmentation). No cpu tier when there are
    GPUs, so offloading happens only when asked for; with no GPU, the free RAM."""
    if torch.cuda.is_available():
        return {f"cuda:{i}": int(torch.cuda.mem_get_info(i)[0] * fraction) for i in range(torch.cuda.device_count())}
    return {"cpu": int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * fraction)}


@lru_cache(maxsize=8)
def _block_params(cfg_json: str) -> dict[str, int]:
    """Parameter count of each block, from a model built on the meta device (shapes only, no memory)."""
    cfg = CogVLMConfig.from_dict(json.loads(cfg_json))
    with torch.device("meta"):
        model = CogVLM(cfg)
    return {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in block_names(cfg)}


def transient_bytes(name: str, cfg: CogVLMConfig, batch: int, context: int, nbytes: int) -> int:
    """The biggest temporaries of one block's forward: a reserve kept free on its device (freed after the block,
    so a device reserves the largest of its blocks', not their sum). One image per row; attention is fused."""
    v, t = cfg.vision, cfg.text
    vit_tokens, tokens = batch * (v.num_patches + 1), batch * context
    if name == "vision.patch_embed":
        return vit_tokens * 2 * v.hidden_size * nbytes  # conv output, then with cls and positions
    if name.startswith("vision.layers."):
        return vit_tokens * (3 * v.hidden_size + 2 * v.intermediate_size) * nbytes  # qkv; fc1 and its GELU
    if name == "adapter":
        return batch * v.num_patches * (t.hidden_size + 3 * t.intermediate_size) * nbytes  # proj; gate|up, product
    if name.startswith("llm.layers."):  # qkv, attention out; gate|up, product; q and k rotated in fp32
        return tokens * ((4 * t.hidden_size + 3 * t.intermediate_size) * nbytes + 2 * t.hidden_size * 4)
    if name == "llm.lm_head":
        return tokens * t.vocab_size * (nbytes + 4)  # logits in the model dtype, then their fp32 copy
    return tokens * t.hidden_size * (nbytes + 4)  # embed, norm (RMSNorm works on an fp32 copy)


@dataclass
class DeviceUse:
    budget: int
    blocks: list[str] = field(default_factory=list)
    weights: int = 0
    kv_cache: int = 0
    activations: int = 0  # reserve for the largest transient of its blocks

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


@dataclass
class Plan:
    device_map: dict[str, str]  # block -> device, forward order
    devices: dict[str, DeviceUse]  # every budgeted device, cpu last, used or not
    strategy: str
    batch_size: int
    context: int
    dtype: str

    def to_dict(self) -> dict:
        devices = {d: {**dataclasses.asdict(u), "blocks": _compact(u.blocks), "total": u.total}
                   for d, u in self.devices.items()}
        return {"strategy": self.strategy, "batch_size": self.batch_size, "context": self.context,
                "dtype": self.dtype, "device_map": self.device_map, "devices": devices}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        rows = [f"{'device':<8}{'budget':>8}{'weights':>9}{'kv':>7}{'act':>7}{'total':>8}  blocks (GiB; strategy "
                f"{self.strategy}, {self.dtype}, batch {self.batch_size}, context {self.context})"]
        for d, u in self.devices.items():
            rows.append(f"{d:<8}{g(u.budget):>8}{g(u.weights):>9}{g(u.kv_cache):>7}{g(u.activations):>7}"
                        f"{g(u.total):>8}  {', '.join(_compact(u.blocks)) or '-'}")
        return "\n".join(rows)


def plan(config: CogVLMConfig, max_memory, batch_size: int = 1, context: int = 2048, dtype=torch.bfloat16,
         strategy: str = "auto") -> Plan:
    """Place the blocks, in forward order, on contiguous runs of the budgeted devices (GPUs by index, cpu last).

    "auto" fills each device in turn up to its budget. "balanced" puts as many blocks on the GPUs as "auto" does
    (so cpu holds only what the GPUs cannot) but evens the GPUs' loads out, as far as budgets and blocks allow.
    Counts weights, each decoder layer's KV cache (2 * batch * context * hidden * dtype bytes) and each device's
    activation reserve; raises DoesNotFitError, with the numbers, when no placement fits.
    """
    if strategy not in STRATEGIES:
        raise DeviceMapError(f"unknown strategy {strategy!r}; choose {' or '.join(STRATEGIES)}")
    if batch_size < 1 or context < 1:
        raise DeviceMapError(f"batch size ({batch_size}) and context ({context}) must be at least 1")
    raw = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    budgets = {str(to_device(k)): parse_size(v) for k, v in raw.items()}
    order = lambda d: (d == "cpu", to_device(d).type, to_device(d).index or 0)  # noqa: E731  GPUs by index
    budgets = dict(sorted(budgets.items(), key=lambda kv: order(kv[0])))
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype  # "bf16" works too
    nbytes = torch.empty((), dtype=dtype).element_size()
    names = block_names(config)
    weights = {n: p * nbytes for n, p in _block_params(json.dumps(config.to_dict(), sort_keys=True)).items()}
    kv = {n: 2 * batch_size * context * config.text.hidden_size * nbytes if n.startswith("llm.layers.") else 0
          for n in names}
    peak = {n: transient_bytes(n, config, batch_size, context, nbytes) for n in names}

    # Placement units: one block each, except that llm.embed travels with llm.layers.0 (see block_devices): with
    # llm.embed left out of the list, llm.layers.0 moves up into its index.
    units = [[n] for n in names if n != "llm.embed"]
    units[names.index("llm.embed")].insert(0, "llm.embed")
    prefix = list(accumulate((sum(weights[n] + kv[n] for n in u) for u in units), initial=0))
    n = len(units)
    peak_max = [[0] * (n + 1) for _ in range(n + 1)]  # peak_max[i][j]: the largest transient of units i..j-1
    for i in range(n):
        for j in range(i + 1, n + 1):
            peak_max[i][j] = max(peak_max[i][j - 1], max(peak[b] for b in units[j - 1]))
    cost = lambda i, j: prefix[j] - prefix[i] + peak_max[i][j]  # noqa: E731  bytes of units i..j-1 on one device

    bounds = [0]  # "auto": device k takes units bounds[k]..bounds[k+1]-1, as many as fit
    for cap in budgets.values():
        i = bounds[-1]
        while i < n and cost(bounds[-1], i + 1) <= cap:
            i += 1
        bounds.append(i)
    if bounds[-1] < n:
        raise _does_not_fit(units[bounds[-1]:], weights, kv, peak, budgets)
    gpus = [cap for d, cap in budgets.items() if d != "cpu"]
    if strategy == "balanced" and len(gpus) > 1:
        bounds = _balance(cost, bounds[len(gpus)], gpus) + bounds[len(gpus) + 1:]

    devices = {d: DeviceUse(budget=cap) for d, cap in budgets.items()}
    for (d, use), i, j in zip(devices.items(), bounds, bounds[1:]):
        use.blocks = [b for u in units[i:j] for b in u]
        use.weights, use.kv_cache = sum(weights[b] for b in use.blocks), sum(kv[b] for b in use.blocks)
        use.activations = peak_max[i][j]
    device_map = {b: d for d, use in devices.items() for b in use.blocks}
    dtype_name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype))
    return Plan(device_map, devices, strategy, batch_size, context, dtype_name)


def _balance(cost, k: int, caps: list[int]) -> list[int]:
    """Cut units 0..k-1 into len(caps) contiguous runs within their caps: the smallest possible largest load, and
    with that, the largest possible smallest load (so no GPU is left light). Returns the boundaries [0, ..., k]."""
    top, _ = _best_cuts(cost, k, caps, max, operator.lt, 0)
    return _best_cuts(cost, k, [min(cap, top) for cap in caps], min, operator.gt, float("inf"))[1]


def _best_cuts(cost, k: int, caps: list[int], combine, better, start):
    """Exact dynamic programming over contiguous cuts: a cut's score folds its runs' costs with `combine` (max or
    min), `better` compares scores. best[j] is the best score of units 0..j-1 on the devices so far."""
    best, back = [start] + [None] * k, []
    for cap in caps:
        new, arg = [None] * (k + 1), [0] * (k + 1)
        for j in range(k + 1):
            for i in range(j + 1):
                c = cost(i, j)
                if best[i] is not None and c <= cap and (new[j] is None or better(combine(best[i], c), new[j])):
                    new[j], arg[j] = combine(best[i], c), i
        best, back = new, back + [arg]
    bounds = [k]
    for arg in reversed(back):
        bounds.append(arg[bounds[-1]])
    return best[k], bounds[::-1]


def _does_not_fit(left: list[list[str]], weights, kv, peak, budgets) -> DoesNotFitError:
    w, c, a = sum(weights.values()), sum(kv.values()), max(peak.values())
    needed, available = w + c + a, sum(budgets.values())
    per_device = ", ".join(f"{d} {cap / GiB:.1f}" for d, cap in budgets.items()) if len(budgets) <= 8 else \
        f"{len(budgets)} devices"
    first = sum(weights[b] + kv[b] for b in left[0]) + max(peak[b] for b in left[0])
    why = (f"{' + '.join(left[0])} alone needs {first / GiB:.2f} GiB with its activations, more than any one "
           "budget" if first > max(budgets.values()) else "the budgets are full")
    return DoesNotFitError(
        f"the model does not fit: it needs {needed / GiB:.1f} GiB (weights {w / GiB:.1f} + KV cache {c / GiB:.1f} "
        f"+ activations {a / GiB:.1f}), budgets total {available / GiB:.1f} GiB ({per_device}); from {left[0][0]} "
        f"on, {sum(weights[b] + kv[b] for u in left for b in u) / GiB:.1f} GiB found no room ({why}). Raise "
        "--max-memory, add cpu=..., lower --batch-size/--context, or use a smaller dtype", needed, available)


# -- command line --------------------------------------------------------------------------------------------------
def add_plan_command(subparsers):
    """Register `cogvlm plan` on the CLI's subparsers."""
    p = subparsers.add_parser("plan", help="plan which device holds which block, from per-device memory budgets",
                              epilog="example: cogvlm plan --model cogvlm-chat-hf --max-memory 0=20GiB,1=20GiB")
    p.add_argument("--model", required=True, help="preset (cogvlm-chat-hf, ...), config file or checkpoint folder")
    p.add_argument("--max-memory", required=True, help="budgets, e.g. 0=20GiB,1=20GiB,cpu=60GiB (GiB/GB/MiB/MB)")
    p.add_argument("--batch-size", type=int, default=1, help="rows decoded together (default 1)")
    p.add_argument("--context", type=int, help="tokens per row, image included (default: max_position_embeddings)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="auto: fill devices in order; balanced: even out the GPUs (default auto)")
    p.add_argument("--json", action="store_true", help="print a machine-readable object")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args) -> int:
    """Print the plan; exit with status 2 and the numbers when it cannot fit."""
    cfg = CogVLMConfig.load(args.model)
    try:
        result = plan(cfg, args.max_memory, args.batch_size, args.context or cfg.text.max_position_embeddings,
                      DTYPES[args.dtype], args.strategy)
    except DoesNotFitError as e:
        if args.json:
            print(json.dumps({"error": str(e), "needed": e.needed, "available": e.available}))
        print(f"cogvlm plan: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(result.to_json() if args.json else result.format_table())
    return 0
