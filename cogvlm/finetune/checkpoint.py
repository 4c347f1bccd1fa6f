"""What a run writes: training checkpoints that resume exactly, and the finished model.

A checkpoint `RUN/checkpoints/step-NNNNNNNN/` holds only what trains and what the loop needs to continue:
`trainable-*.safetensors` (trained parameters, LoRA A and B, by their names in the model), `optimizer-*.safetensors`
(AdamW state, "<parameter name>/<slot>"), `rng-*.safetensors` (torch CPU and CUDA generators) and `state.json`
(step, the run's options, optimizer groups by parameter name, scheduler and Python RNG state). Nothing is pickled.
The model itself is saved in our converted layout (`save_model`), loadable by `CogVLM.from_pretrained`. Every folder
is written through `cogvlm.shards` (one writer, a temporary folder renamed into place when complete).
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import torch
from torch import nn

from ..convert import TOKENIZER_FILE, _write_config
from ..lora import LoRALinear
from ..model import CogVLM
from ..shards import (DEFAULT_SHARD_BYTES, ShardWriter, atomic_folder, list_shards, open_shard, parse_dtype,
                      read_tensors, write_tensors)

CHECKPOINT_FORMAT = "cogvlm-finetune-checkpoint"
TENSOR_FILE_BYTES = 2 * 2**30  # checkpoint tensor files are split at this size


# ============================================================================================ RNG states
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random generator the loop draws from: torch's (CPU, each CUDA device) as tensors, Python's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"python_random": [version, list(state), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, state, gauss = meta["python_random"]
    random.setstate((version, tuple(state), gauss))


def restore_rng(path: Path, meta: dict) -> None:
    """Set the RNG states saved in checkpoint `path` (done last, after everything that draws while loading)."""
    if (path / "rng.safetensors").exists():  # checkpoints written before rng-*.safetensors
        with open_shard(path / "rng.safetensors") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        tensors = read_tensors(path, "rng")
    set_rng_state(tensors, meta["rng"])


# ======================================================================================= training checkpoints
def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: dict,
    rng: tuple[dict, dict] | None = None, keep: int | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step-NNNNNNNN/` (the RNG as now, or `rng`); then keep only the latest `keep`."""
    names = {p: n for n, p in model.named_parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    slots = [(f"{names[p]}/{key}", value) for p, st in optimizer.state.items()
             for key, value in st.items() if isinstance(value, torch.Tensor)]
    rng_tensors, rng_meta = rng or rng_state()
    groups = [{**{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"},
               "params": [names[p] for p in g["params"]]} for g in optimizer.param_groups]
    meta = {
        "format": CHECKPOINT_FORMAT, "format_version": 1, "step": step, **state,
        "trainable": [n for n, _ in trainable], "param_groups": groups,
        "scheduler": scheduler.state_dict(), "rng": rng_meta,
    }
    final = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    with atomic_folder(final, force=True) as tmp:
        write_tensors(tmp, "trainable", trainable, TENSOR_FILE_BYTES)
        write_tensors(tmp, "optimizer", slots, TENSOR_FILE_BYTES)
        write_tensors(tmp, "rng", rng_tensors.items())
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").exists()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / "state.json").exists():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint to resume from in {path} (expected {path}/checkpoints/step-*/)")
    return ckpts[-1]


def read_checkpoint_state(path: str | Path) -> dict:
    meta = json.loads((Path(path) / "state.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cogvlm fine-tuning checkpoint")
    return meta


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore trainable parameters, optimizer and scheduler state from a checkpoint; returns its state.json
    (the caller restores the RNG states last, with `restore_rng`)."""
    meta = read_checkpoint_state(path)
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if sorted(trainable) != sorted(meta["trainable"]):
        extra = sorted(set(trainable) ^ set(meta["trainable"]))[:5]
        raise ValueError(f"checkpoint {path} trained a different parameter set (differences: {extra}); "
                         "resume with the same --preset, --train, --freeze and LoRA options")
    device = next(model.parameters()).device
    with torch.no_grad():
        for name, t in read_tensors(path, "trainable").items():
            params[name].copy_(t.to(device=device, dtype=params[name].dtype))
    index, groups = {}, []  # the optimizer's state dict numbers parameters in group order
    for g, saved in zip(optimizer.param_groups, meta["param_groups"]):
        names = saved["params"]
        if [params[n] for n in names] != list(g["params"]):
            raise ValueError(f"checkpoint {path}: optimizer parameter groups differ from this run's")
        for n in names:
            index[n] = len(index)
        groups.append({**{k: (tuple(v) if k == "betas" else v) for k, v in saved.items()},
                       "params": [index[n] for n in names]})
    state: dict[int, dict] = {}
    for key, t in read_tensors(path, "optimizer").items():
        name, _, slot = key.rpartition("/")
        state.setdefault(index[name], {})[slot] = t
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    return meta


def file_digest(path: str | Path) -> str:
    """sha256 of a file (the training data, so that a resume can tell it changed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ============================================================================================ the model
def save_model(
    model: CogVLM,
    folder: str | Path,
    tokenizer: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    hf_config: dict | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the model in our converted layout (sharded safetensors + index, cogvlm_config.json, tokenizer.model),
    into a temporary folder renamed into place when complete. LoRA adapters must be merged first (`merge_lora`).
    `hf_config` is the hub config.json kept for `export_hf` (default: made from the model's config)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model has unmerged LoRA adapters; call cogvlm.lora.merge_lora(model) first")
    dtype = parse_dtype(dtype)
    folder = Path(folder)
    with atomic_folder(folder, force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, p in model.named_parameters():
            writer.add(name, p.detach().to(device="cpu", dtype=dtype or p.dtype).clone())
        writer.close()
        _write_config(tmp, model.cfg, hf_config or model.cfg.to_hf_dict())
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return folder


def checkpoint_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype a converted checkpoint folder stores its weights in (that of its first tensor; header only)."""
    for file, _ in list_shards(folder):
        with open_shard(file) as f:
            for key in f.keys():
                return SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
    return None


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
