"""`cogvlm quantize`: stream a checkpoint into a quantized one, shard by shard.

The source is a converted folder, a hub-layout folder (names mapped and gate/up fused on the way, as `convert` does)
or a hub id (downloaded first). Each tensor is read, quantized if its layer is one of the targets, and handed to the
shared `ShardWriter`, so memory stays near one input tensor plus one output shard; the output is written into a
temporary folder renamed into place only when complete. Every layer's shape is checked against the quantization
(a group size that does not divide a layer's width) on a meta-device model before anything is written.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch

from ..config import CONFIG_FILE, CogVLMConfig
from ..convert.names import is_dropped, name_table
from ..model import CogVLM
from ..shards import (DEFAULT_SHARD_BYTES, CheckpointError, ShardWriter, atomic_folder, check_safetensors_headers,
                      list_shards, open_shard)
from . import CONFIG_KEY, QuantSpec, quantize_model, requested_spec
from ..meta import meta_device

TOKENIZER_FILE = "tokenizer.model"


def quantize_checkpoint(src: str | Path, dst: str | Path, mode: str, group_size: int | None = None,
                        quantize_vision: bool | None = None, tokenizer: str | Path | None = None,
                        force: bool = False, device: str = "cpu", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        revision: str | None = None) -> Path:
    """Write `src` quantized to `dst` (our layout, `quantization` recorded in its config); returns `dst`.

    `mode`, `group_size` and `quantize_vision` as `load_model(quantize=...)` takes them (int4 groups default to 128,
    the ViT is quantized by default); `device` is where the arithmetic runs (the codes are the same on any device)."""
    folder, meta, shards, tensors = _open_source(src, revision)
    if Path(dst).resolve() == folder.resolve():
        raise ValueError(f"the destination {dst} is the source checkpoint; write the quantized one elsewhere")
    cfg = CogVLMConfig.from_dict(meta)
    with meta_device():
        model = CogVLM(cfg)
    spec = quantize_model(model, requested_spec(None, mode, group_size, quantize_vision))  # shape errors: here
    expected = {k: t.shape for k, t in model.state_dict().items()}
    layers = {name: model.get_submodule(name) for name in spec.modules}
    check_safetensors_headers(shards)
    tok = Path(tokenizer) if tokenizer else folder / TOKENIZER_FILE
    if tokenizer and not tok.exists():
        raise CheckpointError(f"tokenizer file {tok} does not exist")

    with atomic_folder(Path(dst), force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        written: set[str] = set()
        for name, tensor in tensors:
            module_name, _, attr = name.rpartition(".")
            layer = layers.get(module_name)
            pieces = [(name, tensor)] if layer is None else [
                (f"{module_name}.{k}", t.cpu()) for k, t in layer.convert_loaded(attr, tensor.to(device))]
            for key, t in pieces:
                if key not in expected:
                    raise CheckpointError(f"{folder}: unexpected tensor {key!r}; checkpoint and code versions differ")
                if t.shape != expected[key]:
                    raise CheckpointError(f"{folder}: {key} has shape {tuple(t.shape)}, the config implies "
                                          f"{tuple(expected[key])}")
                writer.add(key, t)
                written.add(key)
        missing = sorted(expected.keys() - written)
        if missing:
            raise CheckpointError(f"checkpoint {folder} lacks {len(missing)} tensor(s): {', '.join(missing[:10])}")
        writer.close()
        meta = {**meta, CONFIG_KEY: spec.to_config()}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tok.exists():
            shutil.copyfile(tok, tmp / TOKENIZER_FILE)
        else:
            print(f"cogvlm quantize: {folder} has no {TOKENIZER_FILE}; pass --tokenizer, or give one when loading",
                  file=sys.stderr)
    return Path(dst)


def _open_source(src, revision) -> tuple[Path, dict, list, Iterator[tuple[str, torch.Tensor]]]:
    """(folder, our config dict, shards, iterator of (our name, tensor)) for a converted or hub-layout source."""
    folder = Path(src).expanduser()
    if not folder.exists():
        if str(src).count("/") != 1 or str(src).startswith((".", "/")):
            raise CheckpointError(f"{src} is not a checkpoint folder, and not a hub id like THUDM/cogvlm-chat-hf")
        from ..hub import download

        folder = download(str(src), revision)
    if (folder / CONFIG_FILE).exists():
        meta = json.loads((folder / CONFIG_FILE).read_text())
        stored = QuantSpec.from_config(meta)
        if stored is not None:
            raise CheckpointError(f"{folder} is already quantized ({stored.describe()}); quantize the original")
        shards = list_shards(folder)
        return folder, meta, shards, _read(shards)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} is neither a converted cogvlm folder (no {CONFIG_FILE}) nor a hub-layout "
                              "one (no config.json)")
    hub_config = json.loads((folder / "config.json").read_text())
    cfg = CogVLMConfig.from_hf_dict(hub_config)
    meta = {"format": "cogvlm", "format_version": 1, **cfg.to_dict(), "hf_config": hub_config}
    shards = list_shards(folder)
    return folder, meta, shards, _from_hub(shards, cfg, folder)


def _read(shards) -> Iterator[tuple[str, torch.Tensor]]:
    for file, _ in shards:
        with open_shard(file) as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)


def _from_hub(shards, cfg: CogVLMConfig, folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Our names and tensors from hub-layout shards: the name table of `cogvlm.convert`, MLP gate/up pairs
    concatenated (held until both halves have been read, as `convert` does)."""
    by_hub = {h: e for e in name_table(cfg) for h in e.hub}
    known = [k for _, keys in shards if keys is not None for k in keys if not is_dropped(k)]
    unknown = sorted(set(known) - by_hub.keys())
    if unknown:  # with an index every key is known before the first read
        raise CheckpointError(f"{folder}: unknown tensor(s) {', '.join(unknown[:5])}; not a CogVLM checkpoint")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in _read(shards):
        if is_dropped(name):
            continue
        if name not in by_hub:
            raise CheckpointError(f"{folder}: unknown tensor {name!r}; not a CogVLM checkpoint")
        entry = by_hub[name]
        parts.setdefault(entry.ours, {})[name] = tensor
        if len(parts[entry.ours]) == len(entry.hub):
            pieces = parts.pop(entry.ours)
            yield entry.ours, torch.cat([pieces[h] for h in entry.hub]) if len(entry.hub) > 1 else tensor
