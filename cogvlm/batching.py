"""Choosing a batch size from free memory: `cogvlm caption --batch-size auto` (the default).

Each row of a batch of `context` tokens needs, on every device that holds part of the model, the KV cache of that
device's decoder layers plus its share of the largest temporary of that device's blocks (both grow linearly with the
batch; `cogvlm.parallel.plan` counts them the same way when it places a device map). `rows_that_fit` is that
arithmetic; `auto_batch_size` applies it to a loaded model with what its devices have free, and takes the largest
batch that fits in `HEADROOM` of it on every device, capped at `MAX_BATCH` (past it, captioning gains little: a decode
step at batch 64 is already bound mostly by the weights it reads). On the CPU, where memory is rarely the limit but
compute is, it is `CPU_BATCH`.
"""
from __future__ import annotations

import json

import torch

AUTO = "auto"
CPU_BATCH = 8
MAX_BATCH = 64
HEADROOM = 0.85  # of the free memory: the allocator's fragmentation, compiled kernels' workspaces


def rows_that_fit(cfg, free: dict[str, int], placement: dict[str, str], context: int, dtype: torch.dtype,
                  headroom: float = HEADROOM) -> int:
    """The largest batch whose KV caches and temporaries fit in `headroom` x `free` bytes of every device.
    `placement`: block name (`cogvlm.parallel.device_map.block_names`) -> device; `context`: tokens per row."""
    from .parallel.plan import block_sizes, transient_bytes

    sizes = block_sizes(json.dumps(cfg.to_dict(), sort_keys=True), dtype)
    per_row: dict[str, int] = {}
    for device in set(placement.values()):
        names = [n for n, d in placement.items() if d == device]
        kv = sum(sizes.kv_per_token[n] for n in names) * context
        temporary = max(transient_bytes(n, cfg, 1, context, dtype.itemsize) for n in names)
        per_row[device] = kv + temporary
    return min(int(free[d] * headroom) // need for d, need in per_row.items())


def auto_batch_size(model, prompt: str, template: str, max_new_tokens: int | None, cap: int = MAX_BATCH) -> int:
    """The batch size for captioning with `model` as loaded (on one GPU, several, or the CPU): one image and
    `prompt` per row, `max_new_tokens` each (None: up to the context limit)."""
    from .chat import tokenizer_of
    from .generate import session_length
    from .parallel.device_map import block_names
    from .prompt import build_inputs

    cfg = model.cfg
    placement = {name: str(_device_of(model.get_submodule(name))) for name in block_names(cfg)}
    if all(d == "cpu" for d in placement.values()):
        return CPU_BATCH
    limit = cfg.text.max_position_embeddings
    prompt_tokens = build_inputs(tokenizer_of(model), prompt, None, template, cfg.num_image_tokens,
                                 max_length=limit)["input_ids"].numel()
    context = session_length(model, limit if max_new_tokens is None else min(limit, prompt_tokens + max_new_tokens))
    free = {d: _free_bytes(torch.device(d)) for d in set(placement.values())}
    return max(1, min(cap, rows_that_fit(cfg, free, placement, context, model.dtype)))


def _device_of(module) -> torch.device:
    return next(t.device for t in [*module.parameters(), *module.buffers()])


def _free_bytes(device: torch.device) -> int:
    """Free memory on a GPU, counting what torch's allocator holds cached but unused; the CPU: taken as unlimited
    for the CPU blocks of a device map (their rows are bounded by the GPUs')."""
    if device.type != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
