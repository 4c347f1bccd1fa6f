"""The memory planner: which device holds which block, from per-device memory budgets ("auto", "balanced").

Each block's bytes come from the real modules, built on the meta device (no memory) after an optional `prepare`
callback that swaps modules in (the loader's seam: a quantized linear's int8/int4 weights and scales are counted as
they will be stored), so a map that cannot fit is refused before any weight is read. On top of the weights, each
device reserves its decoder layers' KV cache and the largest temporary of its blocks' forward passes.
"""
from __future__ import annotations

import dataclasses
import json
import operator
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate
from typing import Callable

import torch

from ..config import CogVLMConfig
from ..model import CogVLM
from ..shards import DTYPES
from .device_map import STRATEGIES, DeviceMapError, block_devices, block_names, check_available, compact, to_device
from ..meta import meta_device

GiB = 2**30
UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "kib": 2**10, "kb": 10**3, "b": 1, "": 1}


class DoesNotFitError(DeviceMapError):
    """The blocks cannot be placed within the budgets; `needed` and `available` are in bytes."""

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed, self.available = needed, available


def resolve_device_map(device_map, cfg: CogVLMConfig, max_memory=None, **plan_options) -> dict[str, torch.device]:
    """One device per block for this machine: a dict or `Plan` is normalised (`block_devices`); "auto"/"balanced"
    are planned from `max_memory` (default: `default_max_memory()`) with `plan_options` (see `plan`)."""
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise DeviceMapError(f"device_map {device_map!r}: give a dict of block -> device, 'auto' or 'balanced'")
        budgets = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
        if budgets is not None:
            check_available(budgets, "max_memory (--max-memory)")  # before planning for GPUs that are not here
        device_map = plan(cfg, budgets or default_max_memory(), strategy=device_map, **plan_options)
    return block_devices(device_map, cfg)


# -- budgets -------------------------------------------------------------------------------------------------------
def parse_size(text) -> int:
    """20GiB, 20 GB, 512MiB, 512MB, 1024 (bytes) -> bytes. GiB/MiB are powers of 2, GB/MB powers of 10."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in UNITS:
        raise DeviceMapError(f"cannot read the size {text!r} (--max-memory); write e.g. 20GiB, 20GB, 512MiB or 512MB")
    return int(float(m[1]) * UNITS[m[2].lower()])


def parse_max_memory(text: str) -> dict[str, int]:
    """"0=20GiB,1=20GiB,cpu=60GiB" -> {"cuda:0": bytes, "cuda:1": bytes, "cpu": bytes}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise DeviceMapError(f"cannot read {item!r} in the memory budgets (--max-memory); write DEVICE=SIZE "
                                 "pairs such as 0=20GiB,1=20GiB,cpu=60GiB")
        out[str(to_device(key))] = parse_size(value)
    if not out:
        raise DeviceMapError("no memory budgets given (--max-memory); write e.g. 0=20GiB,1=20GiB,cpu=60GiB")
    return out


def default_max_memory(fraction: float = 0.9) -> dict[str, int]:
    """90% of each GPU's free memory (the rest for the CUDA context and fragmentation). No cpu tier when there are
    GPUs, so offloading happens only when asked for; with no GPU, the free RAM."""
    if torch.cuda.is_available():
        return {f"cuda:{i}": int(torch.cuda.mem_get_info(i)[0] * fraction) for i in range(torch.cuda.device_count())}
    return {"cpu": int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * fraction)}


# -- what each block needs -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSizes:
    weights: dict[str, int]  # bytes of each block's parameters and buffers, as they will be loaded
    kv_per_token: dict[str, int]  # KV-cache bytes per (row, cache slot) of each block: decoder layers only


@lru_cache(maxsize=8)
def block_sizes(cfg_json: str, dtype: torch.dtype, prepare: Callable[[CogVLM], None] | None = None) -> BlockSizes:
    """Measure every block on a model built on the meta device (shapes only, no memory), after `prepare(model)`.

    Floating-point tensors are counted in `dtype` (the loader casts them to it), others as they are (quantized
    integers load as stored), so a swapped module's real storage is what is counted. A KV cache holds K and V of
    each attention's own heads (`attn.num_heads * attn.head_dim`, fewer under tensor parallelism) in `dtype`."""
    cfg = CogVLMConfig.from_dict(json.loads(cfg_json))
    with meta_device():
        model = CogVLM(cfg, dtype=dtype)
        if prepare is not None:
            prepare(model)
    itemsize = dtype.itemsize

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (itemsize if t.is_floating_point() else t.element_size())

    weights, kv = {}, {}
    for name in block_names(cfg):
        module = model.get_submodule(name)
        weights[name] = sum(nbytes(t) for t in [*module.parameters(), *module.buffers()])
        attn = module.attn if name.startswith("llm.layers.") else None  # decoder layers hold the caches
        kv[name] = 0 if attn is None else 2 * attn.num_heads * attn.head_dim * itemsize
    return BlockSizes(weights, kv)


def transient_bytes(name: str, cfg: CogVLMConfig, batch: int, context: int, nbytes: int,
                    full_logits: bool = False) -> int:
    """The biggest temporaries of one block's forward: a reserve kept free on its device (freed after the block,
    so a device reserves the largest of its blocks', not their sum). One image per row; attention is fused.
    Generation (prefill, decode steps) computes the logits of the last position only; `full_logits` counts a
    forward over every position (scoring, training)."""
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
    if name == "llm.lm_head":  # logits in the model dtype, then their fp32 copy
        return (tokens if full_logits else batch) * t.vocab_size * (nbytes + 4)
    return tokens * t.hidden_size * (nbytes + 4)  # embed, norm (RMSNorm works on an fp32 copy)


# -- the plan ------------------------------------------------------------------------------------------------------
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
    full_logits: bool = False

    def to_dict(self) -> dict:
        devices = {d: {**dataclasses.asdict(u), "blocks": compact(u.blocks), "total": u.total}
                   for d, u in self.devices.items()}
        return {"strategy": self.strategy, "batch_size": self.batch_size, "context": self.context,
                "dtype": self.dtype, "full_logits": self.full_logits, "device_map": self.device_map,
                "devices": devices}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        logits = ", logits of every position" if self.full_logits else ""
        rows = [f"{'device':<8}{'budget':>8}{'weights':>9}{'kv':>7}{'act':>7}{'total':>8}  blocks (GiB; strategy "
                f"{self.strategy}, {self.dtype}, batch {self.batch_size}, context {self.context}{logits})"]
        for d, u in self.devices.items():
            rows.append(f"{d:<8}{g(u.budget):>8}{g(u.weights):>9}{g(u.kv_cache):>7}{g(u.activations):>7}"
                        f"{g(u.total):>8}  {', '.join(compact(u.blocks)) or '-'}")
        return "\n".join(rows)


def plan(config: CogVLMConfig, max_memory, batch_size: int = 1, context: int | None = None, dtype=torch.bfloat16,
         strategy: str = "auto", full_logits: bool = False, prepare: Callable[[CogVLM], None] | None = None) -> Plan:
    """Place the blocks, in forward order, on contiguous runs of the budgeted devices (GPUs by index, cpu last).

    "auto" fills each device in turn up to its budget. "balanced" puts as many blocks on the GPUs as "auto" does
    (so cpu holds only what the GPUs cannot) but evens the GPUs' loads out, as far as budgets and blocks allow.
    Counts weights (`block_sizes`, after `prepare`), each decoder layer's KV cache for `batch_size` rows of
    `context` tokens (default: max_position_embeddings, what a session can grow to) and each device's activation
    reserve (`transient_bytes`); raises DoesNotFitError, with the numbers, when no placement fits.
    """
    if strategy not in STRATEGIES:
        raise DeviceMapError(f"unknown strategy {strategy!r}; choose {' or '.join(STRATEGIES)}")
    context = config.text.max_position_embeddings if context is None else context
    if batch_size < 1 or context < 1:
        raise DeviceMapError(f"batch size ({batch_size}) and context ({context}) must be at least 1")
    raw = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    budgets = {str(to_device(k)): parse_size(v) for k, v in raw.items()}
    order = lambda d: (d == "cpu", to_device(d).type, to_device(d).index or 0)  # noqa: E731  GPUs by index
    budgets = dict(sorted(budgets.items(), key=lambda kv: order(kv[0])))
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype  # "bf16" works too
    names = block_names(config)
    sizes = block_sizes(json.dumps(config.to_dict(), sort_keys=True), dtype, prepare)
    weights = sizes.weights
    kv = {n: batch_size * context * sizes.kv_per_token[n] for n in names}
    peak = {n: transient_bytes(n, config, batch_size, context, dtype.itemsize, full_logits) for n in names}

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
    return Plan(device_map, devices, strategy, batch_size, context, dtype_name, full_logits)


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
