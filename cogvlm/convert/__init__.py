"""Conversion between the hub layout (`THUDM/cogvlm-*-hf`) and ours, streamed shard by shard.

    python -m cogvlm convert SRC DST [--dtype bf16]     # hub layout -> ours
    python -m cogvlm export-hf DST OUT                  # ours -> hub layout (a round trip is bit-identical)

Our layout is a folder with sharded safetensors, `model.safetensors.index.json`, `cogvlm_config.json` (our config
plus the hub's original config.json, kept for export) and, when known, the `tokenizer.model`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import CONFIG_FILE, CogVLMConfig
from ..llm import rope_inv_freq
from ..shards import (
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    ShardWriter,
    atomic_folder,
    check_safetensors_headers,
    list_shards,
    open_shard,
    parse_dtype,
)
from .names import Entry, hub_buffers, is_dropped, name_table, to_hub
from ..meta import meta_device

__all__ = ["convert", "export_hf", "expected_shapes", "CheckpointError", "name_table", "to_hub"]

TOKENIZER_FILE = "tokenizer.model"


def expected_shapes(cfg: CogVLMConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes for this config, from a model built on the meta device (no memory)."""
    from ..model import CogVLM

    with meta_device():
        model = CogVLM(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def read_hub_config(src: Path) -> dict:
    if not src.exists():
        raise CheckpointError(f"checkpoint {src} does not exist")
    config = (src if src.is_dir() else src.parent) / "config.json"
    if not config.exists():
        raise CheckpointError(f"{config} not found: a hub-layout checkpoint folder holds its config.json")
    return json.loads(config.read_text())


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
) -> Path:
    """Convert a hub-layout checkpoint folder `src` into our layout at `dst`; returns `dst`.

    Every hub tensor must be used (apart from the rotary `inv_freq` buffers, which are dropped) and every one of our
    tensors filled with the right shape; otherwise a CheckpointError names the offending keys before `dst` exists.
    """
    src, dst, dtype = Path(src), Path(dst), parse_dtype(dtype)
    hub_config = read_hub_config(src)
    cfg = CogVLMConfig.from_hf_dict(hub_config)
    table = name_table(cfg)
    shapes = expected_shapes(cfg)
    by_hub = {h: e for e in table for h in e.hub}
    shards = list_shards(src)
    check_safetensors_headers(shards)
    _check_keys(shards, by_hub, src)

    with atomic_folder(dst, force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        parts: dict[str, dict[str, torch.Tensor]] = {}  # fused entries waiting for their other half
        seen: set[str] = set()
        for file, _ in shards:
            with open_shard(file) as shard:
                for key in shard.keys():
                    if is_dropped(key):
                        continue
                    if key not in by_hub:
                        raise CheckpointError(f"{file}: unknown tensor {key!r}; this is not a {_variant(cfg)} checkpoint")
                    entry = by_hub[key]
                    tensor = shard.get_tensor(key)
                    parts.setdefault(entry.ours, {})[key] = tensor if dtype is None else tensor.to(dtype)
                    if len(parts[entry.ours]) == len(entry.hub):
                        writer.add(entry.ours, _join(entry, parts.pop(entry.ours), shapes))
                        seen.add(entry.ours)
        missing = [e.ours for e in table if e.ours not in seen]
        if missing:
            raise CheckpointError(f"checkpoint {src} lacks tensors for: {', '.join(missing[:10])}")
        writer.close()
        _write_config(tmp, cfg, hub_config)
        tok = Path(tokenizer) if tokenizer else (src / TOKENIZER_FILE if src.is_dir() else None)
        if tokenizer and not tok.exists():
            raise CheckpointError(f"tokenizer file {tok} does not exist")
        if tok is not None and tok.exists():
            shutil.copyfile(tok, tmp / TOKENIZER_FILE)
    return dst


def export_hf(
    src: str | Path,
    out: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
) -> Path:
    """Write a converted checkpoint back in the hub layout (names, unfused gate/up, config.json)."""
    src, out, dtype = Path(src), Path(out), parse_dtype(dtype)
    if not (src / CONFIG_FILE).exists():
        raise CheckpointError(f"{src} is not a converted cogvlm checkpoint (no {CONFIG_FILE}); run `cogvlm convert` first")
    meta = json.loads((src / CONFIG_FILE).read_text())
    cfg = CogVLMConfig.from_dict(meta)
    by_ours = {e.ours: e for e in name_table(cfg)}
    shapes = expected_shapes(cfg)
    shards = list_shards(src)
    check_safetensors_headers(shards)
    with atomic_folder(out, force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        written_dtype = None
        for file, _ in shards:
            with open_shard(file) as shard:
                for key in shard.keys():
                    if key not in by_ours:
                        raise CheckpointError(f"{file}: unknown tensor {key!r}")
                    tensor = shard.get_tensor(key)
                    _check_shape(key, tensor, shapes, file)
                    tensor = tensor if dtype is None else tensor.to(dtype)
                    written_dtype = tensor.dtype
                    for hub_name, part in to_hub(by_ours[key], tensor).items():
                        writer.add(hub_name, part.clone())
        inv_freq = rope_inv_freq(cfg.text.head_dim, cfg.text.rope_theta)
        for name in hub_buffers(cfg):
            writer.add(name, inv_freq.to(written_dtype or torch.float32).clone())
        writer.close()
        hub_config = meta.get("hf_config") or cfg.to_hf_dict()
        (tmp / "config.json").write_text(json.dumps(hub_config, indent=2) + "\n")
        if (src / TOKENIZER_FILE).exists():
            shutil.copyfile(src / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    return out


def _variant(cfg: CogVLMConfig) -> str:
    return f"CogVLM ({cfg.text.num_hidden_layers} decoder / {cfg.vision.num_hidden_layers} ViT layers)"


def _check_keys(shards, by_hub: dict[str, Entry], src: Path) -> None:
    """With an index we know every key before reading a byte: fail early on unknown or missing ones."""
    if any(keys is None for _, keys in shards):
        return  # single .bin/.safetensors without index: checked while streaming
    keys = {k for _, ks in shards for k in ks if not is_dropped(k)}
    unknown = sorted(keys - by_hub.keys())
    missing = sorted(by_hub.keys() - keys)
    if unknown or missing:
        lines = [f"checkpoint {src} does not match its config.json:"]
        if unknown:
            lines.append(f"  {len(unknown)} unknown tensor(s): {', '.join(unknown[:10])}")
        if missing:
            lines.append(f"  {len(missing)} missing tensor(s): {', '.join(missing[:10])}")
        raise CheckpointError("\n".join(lines))


def _check_shape(name: str, tensor: torch.Tensor, shapes: dict, where) -> None:
    if tensor.shape != shapes[name]:
        raise CheckpointError(
            f"{where}: {name} has shape {tuple(tensor.shape)}, but the config implies {tuple(shapes[name])}; "
            "the weights and config.json are from different models"
        )


def _join(entry: Entry, parts: dict[str, torch.Tensor], shapes: dict) -> torch.Tensor:
    tensors = [parts[h] for h in entry.hub]
    if len(tensors) > 1 and len({t.shape for t in tensors}) != 1:
        raise CheckpointError(
            f"{' and '.join(entry.hub)} must have equal shapes to be fused, got {[tuple(t.shape) for t in tensors]}"
        )
    joined = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    _check_shape(entry.ours, joined, shapes, f"tensor(s) {', '.join(entry.hub)}")
    return joined


def _write_config(folder: Path, cfg: CogVLMConfig, hub_config: dict) -> None:
    meta = {"format": "cogvlm", "format_version": 1, **cfg.to_dict(), "hf_config": hub_config}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
