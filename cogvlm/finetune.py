"""Fine-tuning CogVLM: trainable-parameter presets, LoRA, checkpoints that resume exactly, and export.

    cogvlm finetune --model DIR --data train.jsonl --out runs/x [--eval-data eval.jsonl] [--preset experts|lora|full]
    python -m cogvlm.finetune ...            # the same, without the `cogvlm` entry point

Presets (which parameters train; everything else is frozen):
- `experts` (the paper's recipe): the adapter and the visual expert of every decoder layer
  (`llm.layers.*.attn.vision_expert_qkv`, `...attn.vision_expert_dense`, `llm.layers.*.mlp.vision_expert`, `adapter`);
  the ViT and the whole language path stay frozen.
- `lora`: low-rank adapters on the `--lora-targets` linear layers (default the visual expert's QKV and dense);
  merged into the weights for export.
- `full`: everything (training from scratch with `--init CONFIG` uses this).
`--train PATTERN` / `--freeze PATTERN` (repeatable, applied in that order after the preset) adjust the set by name;
patterns are described in `cogvlm/lora.py`.

A run folder holds `train_config.json`, `metrics.jsonl` (one JSON line per logged step and evaluation),
`checkpoints/step-NNNNNNNN/` (only what trains: trainable parameters and LoRA weights, AdamW state, scheduler, RNG
states and step; tensors in safetensors, the rest in JSON, each written to a temporary folder and renamed) and, at
the end, `final/`: the whole model in our converted layout (LoRA merged, tokenizer copied, written atomically),
loadable by `CogVLM.from_pretrained`. `--resume RUN_OR_CHECKPOINT` continues a run exactly: the same batches,
learning rates, dropout masks and hence the same loss curve as an uninterrupted run.

The loss is the model's (shifted mean cross-entropy over the labelled tokens): `training_loss` calls
`CogVLM.forward(labels=..., return_logits=False)`, which applies the lm_head to the labelled positions only and never
builds the (L x 32000) logits of the image and prompt positions. With gradient accumulation each micro-batch's mean loss is
weighted 1/grad_accum. See docs/finetune.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import CONFIG_FILE, CogVLMConfig
from .convert import TOKENIZER_FILE, _write_config
from .shards import DEFAULT_SHARD_BYTES, DTYPES, ShardWriter, atomic_folder, list_shards, parse_dtype
from .data import ConversationDataset
from .generate import DecodeSession
from .lora import DEFAULT_TARGETS, LoRALinear, apply_lora, merge_lora
from .swap import select
from .layout import IGNORE_INDEX
from .model import CogVLM
from .prompt import build_inputs, pad_batch
from .tokenizer import Tokenizer

PRESETS = {
    "experts": (
        "llm.layers.*.attn.vision_expert_qkv",
        "llm.layers.*.attn.vision_expert_dense",
        "llm.layers.*.mlp.vision_expert",
        "adapter",
    ),
    "lora": (),  # only the adapters' lora_A / lora_B
    "full": ("*",),
}
DEFAULT_LR = {"experts": 1e-5, "lora": 2e-4, "full": 1e-5}
CHECKPOINT_FORMAT = "cogvlm-finetune-checkpoint"
TENSOR_FILE_BYTES = 2 * 2**30  # checkpoint tensor files are split at this size


def log(msg: str) -> None:
    print(f"[finetune] {msg}", file=sys.stderr, flush=True)


# =============================================================================================== model building
def init_weights(model: CogVLM, seed: int = 0, std: float | None = None) -> CogVLM:
    """Initialise a model from scratch, reproducibly.

    Every weight matrix, conv kernel, embedding table and learned vector (cls, positions, boi, eoi) is drawn from
    N(0, std^2), by default with std = 1/sqrt(fan_in) (fan_in = the product of all but the first dimension: a
    linear layer's input width, a conv's in_channels x kernel area, an embedding's width); biases are 0,
    LayerNorm/RMSNorm weights 1. At CogVLM-17B's widths that std is 0.016-0.02, the usual 0.02. For a tiny model a
    fixed 0.02 is far too small: the adapter's SwiGLU, the product of two near-zero projections, then passes almost
    no signal, and a from-scratch model learns the Shapes colours but not the shapes.

    Values are drawn on the CPU in parameter-name order from one seeded generator, so they do not depend on the
    device or on the model's dtype."""
    gen = torch.Generator().manual_seed(seed)
    norm_params = set()
    for mname, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
            norm_params.update(f"{mname}.{p}" for p, _ in module.named_parameters(recurse=False))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name in norm_params:
                value = torch.ones(p.shape) if name.endswith(".weight") else torch.zeros(p.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(p.shape)
            else:
                fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
                value = torch.randn(p.shape, generator=gen) * (std if std is not None else fan_in**-0.5)
            p.copy_(value.to(p.dtype))
    return model


def build_model(config: str | Path | CogVLMConfig, seed: int = 0, device=None, dtype=torch.float32,
                std: float | None = None) -> CogVLM:
    """A freshly initialised CogVLM (`init_weights`) from a config: a CogVLMConfig, one of our config files, a hub
    config.json, a folder holding either, or a preset name."""
    cfg = config if isinstance(config, CogVLMConfig) else CogVLMConfig.load(config)
    model = init_weights(CogVLM(cfg), seed, std)
    model.requires_grad_(False)
    return model.to(device=device).set_dtype(dtype).eval()


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
    """The dtype a converted checkpoint folder stores its weights in (that of its first tensor)."""
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for file, _ in list_shards(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                return names.get(f.get_slice(key).get_dtype())
    return None


# ======================================================================================== trainable parameters
def select_trainable(
    model: CogVLM,
    preset: str = "experts",
    train: Sequence[str] = (),
    freeze: Sequence[str] = (),
    lora_targets: Sequence[str] = DEFAULT_TARGETS,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_dtype: torch.dtype | None = None,
) -> list[str]:
    """Set requires_grad by preset, then `train` patterns (made trainable), then `freeze` patterns (frozen);
    with preset "lora", first wrap the `lora_targets` layers. Returns the trainable parameter names."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "lora":
        apply_lora(model, lora_targets, lora_rank, lora_alpha, lora_dropout, lora_dtype)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    on = set(select(PRESETS[preset], names, "parameter")) if PRESETS[preset] else set()
    if preset == "lora":
        on |= {n for n in names if n.endswith((".lora_A", ".lora_B"))}
    on |= set(select(list(train), names, "parameter")) if train else set()
    on -= set(select(list(freeze), names, "parameter")) if freeze else set()
    for n in on:
        params[n].requires_grad_(True)
    trainable = [n for n in names if n in on]
    if not trainable:
        raise ValueError("no parameter is left to train (check --preset, --train and --freeze)")
    return trainable


def set_gradient_checkpointing(model: CogVLM, enabled: bool = True) -> None:
    """Recompute each ViT block and decoder layer in the backward pass instead of storing its activations."""
    model.vision.gradient_checkpointing = enabled
    model.llm.gradient_checkpointing = enabled


# ===================================================================================================== loss
def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def training_loss(model: CogVLM, batch: dict) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the labelled next tokens, their count): `CogVLM.forward(labels=...).loss`, which
    applies the lm_head to the labelled positions only. `batch` is on the model's device."""
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # position t predicts token t+1
    if n == 0:
        raise ValueError("a batch has no labelled token")
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch.get("pixel_values"),
                labels=batch["labels"], return_logits=False)
    return out.loss, n


# =============================================================================================== generation
@torch.no_grad()
def generate_answers(
    model: CogVLM,
    tokenizer,
    prompts: Sequence[tuple[str, Sequence[tuple[str, str]], torch.Tensor | None]],
    template: str,
    num_image_tokens: int,
    max_new_tokens: int = 32,
    autocast_dtype: torch.dtype | None = None,
) -> list[str]:
    """Greedy answers (argmax, stop at eos) to a batch of (query, history, pixels or None) prompts."""
    device = next(model.parameters()).device
    rows = [build_inputs(tokenizer, q, h, template, num_image_tokens if px is not None else None)
            for q, h, px in prompts]
    batch = pad_batch(rows, pad_id=tokenizer.pad_id, side="left")
    images = [px for _, _, px in prompts if px is not None]
    pixels = torch.stack(images).to(device) if images else None
    B, L = batch["input_ids"].shape
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        session = DecodeSession(model, B, L + max_new_tokens, cuda_graph=False)  # weights change between evals
        if autocast_dtype is not None:
            session.caches = model.new_kv_caches(B, L + max_new_tokens, dtype=autocast_dtype, device=device)
        logits = session.prefill(batch["input_ids"].to(device), batch["token_type_ids"].to(device),
                                 batch["attention_mask"].to(device), pixels)
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        for k in range(max_new_tokens):
            tokens = logits.argmax(-1)
            for i, t in enumerate(tokens.tolist()):
                if not done[i]:
                    if t == tokenizer.eos_id:
                        done[i] = True
                    else:
                        out[i].append(t)
            if bool(done.all()) or k + 1 == max_new_tokens:
                break
            logits = session.step(tokens)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]


@torch.no_grad()
def evaluate(
    model: CogVLM,
    dataset: ConversationDataset,
    batch_size: int = 8,
    generate: bool = True,
    max_new_tokens: int = 32,
    max_examples: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Mean loss over all labelled tokens and, with `generate`, exact-match accuracy of greedy answers
    (whitespace-stripped string equality). Runs in eval mode and restores the previous mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if max_examples is None else min(max_examples, len(dataset))
    total_loss, total_tokens, correct, mistakes = 0.0, 0, 0, []
    try:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss, count = training_loss(model, to_device(dataset.batch(idx), device))
            total_loss += loss.item() * count
            total_tokens += count
            if generate:
                exs = [dataset.examples[i] for i in idx]
                prompts = [(e.query, e.history, dataset.pixels(e) if e.image is not None else None) for e in exs]
                answers = generate_answers(model, dataset.tokenizer, prompts, dataset.template,
                                           dataset.num_image_tokens, max_new_tokens, autocast_dtype)
                for e, a in zip(exs, answers):
                    if a == e.answer.strip():
                        correct += 1
                    elif len(mistakes) < 5:
                        mistakes.append({"source": e.source, "query": e.query, "expected": e.answer, "got": a})
    finally:
        model.train(was_training)
    result = {"eval_loss": total_loss / max(total_tokens, 1), "eval_examples": n}
    if generate:
        result.update(exact_match=correct / max(n, 1), mistakes=mistakes)
    return result


# ================================================================================================ schedule
def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Schedule:
    """A picklable-free callable for LambdaLR (its state lives in the scheduler's last_epoch)."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.total, self.min_ratio)


# ============================================================================================== checkpoints
def _write_tensors(folder: Path, stem: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """safetensors files `stem-00000.safetensors`, ... of at most TENSOR_FILE_BYTES each (tensors copied to CPU)."""
    part, size, index = {}, 0, 0
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if part and size + nbytes > TENSOR_FILE_BYTES:
            save_file(part, str(folder / f"{stem}-{index:05d}.safetensors"))
            part, size, index = {}, 0, index + 1
        part[name] = t
        size += nbytes
    save_file(part, str(folder / f"{stem}-{index:05d}.safetensors"))


def _read_tensors(folder: Path, stem: str, device="cpu") -> dict[str, torch.Tensor]:
    out = {}
    files = sorted(glob.glob(str(folder / f"{stem}-*.safetensors")))
    if not files:
        raise FileNotFoundError(f"checkpoint {folder} has no {stem}-*.safetensors")
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"python_random": [version, list(state), gauss]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, state, gauss = meta["python_random"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: dict,
    rng: tuple[dict, dict] | None = None, keep: int | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step-NNNNNNNN/` (temporary folder renamed when complete); prune to `keep`."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        names = {p: n for n, p in model.named_parameters()}
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        _write_tensors(tmp, "trainable", trainable)
        opt_tensors = []
        for p, st in optimizer.state.items():
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors.append((f"{names[p]}/{key}", value))
        _write_tensors(tmp, "optimizer", opt_tensors)
        rng_tensors, rng_meta = rng or _rng_state()
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        groups = []
        for g in optimizer.param_groups:
            groups.append({**{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"},
                           "params": [names[p] for p in g["params"]]})
        meta = {
            "format": CHECKPOINT_FORMAT, "format_version": 1, "step": step, **state,
            "trainable": [n for n, _ in trainable], "param_groups": groups,
            "scheduler": scheduler.state_dict(), "rng": rng_meta,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    (the caller restores the RNG states last, with `_set_rng_state`)."""
    meta = read_checkpoint_state(path)
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if sorted(trainable) != sorted(meta["trainable"]):
        extra = sorted(set(trainable) ^ set(meta["trainable"]))[:5]
        raise ValueError(f"checkpoint {path} trained a different parameter set (differences: {extra}); "
                         "resume with the same --preset, --train, --freeze and LoRA options")
    device = next(model.parameters()).device
    with torch.no_grad():
        for name, t in _read_tensors(path, "trainable").items():
            params[name].copy_(t.to(device=device, dtype=params[name].dtype))
    opt = _read_tensors(path, "optimizer")
    index = {}
    groups = []
    for g, saved in zip(optimizer.param_groups, meta["param_groups"]):
        names = saved["params"]
        if [params[n] for n in names] != list(g["params"]):
            raise ValueError(f"checkpoint {path}: optimizer parameter groups differ from this run's")
        for n in names:
            index[n] = len(index)
        groups.append({**{k: (tuple(v) if k == "betas" else v) for k, v in saved.items()},
                       "params": [index[n] for n in names]})
    state: dict[int, dict] = {}
    for key, t in opt.items():
        name, _, slot = key.rpartition("/")
        state.setdefault(index[name], {})[slot] = t
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    return meta


# ================================================================================================== training
@dataclass
class TrainConfig:
    data: str
    out: str
    model: str | None = None  # a converted checkpoint folder to fine-tune
    init: str | None = None  # or: a config to build a model from scratch (init_weights with `seed`)
    tokenizer: str | None = None  # default: MODEL/tokenizer.model (or beside the --init config)
    eval_data: str | None = None
    preset: str = "experts"
    train: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lr: float | None = None  # default per preset: DEFAULT_LR
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None  # default 3 % of the steps
    steps: int | None = None
    epochs: float | None = None  # used when steps is None (default 1 epoch)
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    template: str | None = None  # default: the model's template_version
    all_turns: bool = False
    max_length: int = 2048
    gradient_checkpointing: bool = False
    device: str | None = None
    dtype: str | None = None  # weights/compute dtype: default bf16 on CUDA, fp32 on CPU; not fp32 -> autocast
    trainable_dtype: str = "fp32"  # master weights and AdamW state of the trained parameters
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_max_examples: int | None = None
    eval_batch_size: int | None = None
    eval_generate: bool = True
    max_new_tokens: int = 32
    save_every: int = 0  # 0: no checkpoints
    keep_checkpoints: int = 2
    resume: str | None = None
    export: bool = True
    export_dtype: str | None = None  # default: the source checkpoint's dtype (fp32 for --init)
    export_hf: str | None = None
    threads: int | None = None
    image_cache_mb: float = 1024

    # Options that change the trajectory: a resumed run must use the checkpoint's values.
    TRAJECTORY = ("model", "init", "preset", "train", "freeze", "lora_rank", "lora_alpha", "lora_dropout",
                  "lora_targets", "lr", "min_lr_ratio", "weight_decay", "betas", "warmup_steps", "steps", "epochs",
                  "batch_size", "grad_accum", "max_grad_norm", "seed", "template", "all_turns", "max_length",
                  "dtype", "trainable_dtype")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def _file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_model(model: str, tokenizer: str | None = None) -> Path:
    try:
        from .hub import resolve
    except ImportError:  # a tree without cogvlm.hub: converted folders only
        return Path(model)
    return resolve(model, tokenizer=tokenizer)


def _resolve_device_dtype(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.dtype is not None:
        dtype = parse_dtype(cfg.dtype)
    elif device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    return device, dtype


class Trainer:
    """Holds a run's model, data, optimizer and schedule; `run()` trains, evaluates, checkpoints and exports."""

    def __init__(self, cfg: TrainConfig):
        if (cfg.model is None) == (cfg.init is None):
            raise ValueError("give exactly one of --model (a converted checkpoint) or --init (a config to train "
                             "from scratch)")
        if cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise ValueError("--batch-size and --grad-accum must be >= 1")
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.resume_from = find_checkpoint(cfg.resume) if cfg.resume else None
        if self.resume_from is not None:
            self._check_resume_config(read_checkpoint_state(self.resume_from))
        elif list_checkpoints(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds checkpoints; pass --resume {self.run_dir} to continue "
                             "that run, or choose another --out")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device, self.dtype = _resolve_device_dtype(cfg)
        self.trainable_dtype = parse_dtype(cfg.trainable_dtype)
        self.autocast_dtype = None if self.dtype == torch.float32 else self.dtype
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        # model and tokenizer
        if cfg.model is not None:
            from .loading import load_model

            folder = _resolve_model(cfg.model, cfg.tokenizer)  # a hub id or hub-layout folder: converted once
            self.model = load_model(folder, device=self.device, dtype=self.dtype)
            meta = json.loads((folder / CONFIG_FILE).read_text())
            self.hf_config = meta.get("hf_config")
            self.source_dtype = checkpoint_dtype(folder)
            tok = cfg.tokenizer or folder / TOKENIZER_FILE
        else:
            self.model = build_model(cfg.init, cfg.seed, self.device, self.dtype)
            self.hf_config = None
            self.source_dtype = torch.float32
            init = Path(cfg.init)
            tok = cfg.tokenizer or (init if init.is_dir() else init.parent) / TOKENIZER_FILE
        if not Path(tok).is_file():
            raise FileNotFoundError(f"tokenizer {tok} not found; pass --tokenizer PATH/tokenizer.model")
        self.tokenizer_path = Path(tok)
        self.tokenizer = Tokenizer(tok)
        mcfg = self.model.cfg
        self.template = cfg.template or mcfg.template_version

        # data
        def dataset(path):
            return ConversationDataset(path, self.tokenizer, mcfg.vision.image_size, mcfg.vision.patch_size,
                                       self.template, cfg.max_length, cfg.all_turns, cfg.image_cache_mb)

        self.train_data = dataset(cfg.data)
        self.eval_data = dataset(cfg.eval_data) if cfg.eval_data else None
        per_step = cfg.batch_size * cfg.grad_accum
        if cfg.steps is not None:
            self.total_steps = cfg.steps
        else:
            self.total_steps = math.ceil((cfg.epochs or 1.0) * len(self.train_data) / per_step)
        if self.total_steps < 1:
            raise ValueError("the run has no step to take (check --steps / --epochs)")
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.03 * self.total_steps)

        # what trains
        self.trainable = select_trainable(
            self.model, cfg.preset, cfg.train, cfg.freeze, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha,
            cfg.lora_dropout, self.trainable_dtype)
        params = dict(self.model.named_parameters())
        for n in self.trainable:
            params[n].data = params[n].data.to(self.trainable_dtype)
        set_gradient_checkpointing(self.model, cfg.gradient_checkpointing)
        self.model.train()

        decay = [params[n] for n in self.trainable if params[n].dim() >= 2]
        no_decay = [params[n] for n in self.trainable if params[n].dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.preset]
        # fused on GPUs: one kernel per step and no temporary copy of the AdamW state (the foreach version's copy
        # was 12 GiB for the full-size experts preset in bf16)
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(cfg.betas),
                                           fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _Schedule(self.warmup, self.total_steps, cfg.min_lr_ratio))
        self.step = 0
        self.data_digest = _file_digest(cfg.data)

    # -- resume ------------------------------------------------------------------------------------------------
    def _check_resume_config(self, meta: dict) -> None:
        saved = meta["config"]
        diffs = []
        for key in TrainConfig.TRAJECTORY:
            now = getattr(self.cfg, key)
            now = list(now) if isinstance(now, tuple) else now
            if key in ("model", "init") and now is not None and saved.get(key) is not None:
                same = Path(now).resolve() == Path(saved[key]).resolve()
            else:
                same = now == saved.get(key)
            if not same:
                diffs.append(f"{key}: checkpoint {saved.get(key)!r}, now {now!r}")
        if diffs:
            raise ValueError(f"cannot resume from {self.resume_from}: options that change the training differ "
                             "(pass the same ones, or leave them out on the command line):\n  " + "\n  ".join(diffs))

    def _restore(self) -> None:
        meta = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler)
        if meta.get("data_sha256") and meta["data_sha256"] != self.data_digest:
            log(f"warning: {self.cfg.data} changed since the checkpoint; the run will not continue exactly")
        self.step = meta["step"]
        rng = {}
        with safe_open(str(self.resume_from / "rng.safetensors"), framework="pt") as f:
            for k in f.keys():
                rng[k] = f.get_tensor(k)
        _set_rng_state(rng, meta["rng"])
        log(f"resumed from {self.resume_from} at step {self.step}")

    # -- data order --------------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if getattr(self, "_order_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.train_data), generator=g)
            self._order_epoch = epoch
        return self._order

    def batch_indices(self, step: int, micro: int) -> list[int]:
        """Examples of micro-batch `micro` of optimizer step `step`: a deterministic walk through per-epoch
        shuffles, so a resumed run sees the same batches."""
        n, bs = len(self.train_data), self.cfg.batch_size
        first = (step * self.cfg.grad_accum + micro) * bs
        out = []
        for k in range(first, first + bs):
            out.append(int(self._epoch_order(k // n)[k % n]))
        return out

    # -- the loop ----------------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def train_step(self) -> dict:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = to_device(self.train_data.batch(self.batch_indices(self.step, micro)), self.device)
            with self._autocast():
                loss, _ = training_loss(self.model, batch)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._in_update = True
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(
                torch.stack([p.grad.float().norm() for p in params if p.grad is not None])))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._in_update = False
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm}

    def evaluate(self) -> dict:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return evaluate(self.model, self.eval_data, self.cfg.eval_batch_size or self.cfg.batch_size,
                            self.cfg.eval_generate, self.cfg.max_new_tokens, self.cfg.eval_max_examples,
                            self.autocast_dtype)

    def _metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, rng=None) -> Path:
        state = {"config": self.cfg.to_json(), "data_sha256": self.data_digest, "total_steps": self.total_steps}
        path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, state, rng,
                               self.cfg.keep_checkpoints)
        log(f"saved checkpoint {path}")
        return path

    def run(self) -> dict:
        """Train to the last step; returns {"history": [...step records of this invocation], "eval": ...,
        "final": path or None, "seconds": training time}."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            self._restore()
            self._truncate_metrics()
        elif (self.run_dir / "metrics.jsonl").exists():
            (self.run_dir / "metrics.jsonl").unlink()  # a new run in a folder without checkpoints starts afresh
        (self.run_dir / "train_config.json").write_text(json.dumps(self.cfg.to_json(), indent=2) + "\n")
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        log(f"{cfg.preset}: training {n_train:,} of {n_all:,} parameters ({len(self.trainable)} tensors) on "
            f"{self.device} ({str(self.dtype).removeprefix('torch.')}{', autocast' if self.autocast_dtype else ''}); "
            f"{len(self.train_data)} examples, {self.total_steps} steps of {cfg.batch_size}x{cfg.grad_accum}, "
            f"lr {self.lr:g}, warmup {self.warmup}")
        history, last_eval, rng_at_start = [], None, None
        start_time = time.time()
        start_step = self.step
        window = []
        try:
            while self.step < self.total_steps:
                rng_at_start = _rng_state()
                t0 = time.time()
                rec = self.train_step()
                window.append(time.time() - t0)
                rec["time"] = round(time.time() - start_time, 3)
                history.append(rec)
                self._metrics(rec)
                if self.step % cfg.log_every == 0 or self.step in (start_step + 1, self.total_steps):
                    per_step = sum(window) / len(window)
                    window = []
                    eta = per_step * (self.total_steps - self.step)
                    log(f"step {self.step}/{self.total_steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                        f"grad-norm {rec['grad_norm']:.3f} | {per_step:.2f} s/step, eta {_hms(eta)}")
                rng_at_start = None
                if self.eval_data is not None and cfg.eval_every and self.step % cfg.eval_every == 0 \
                        and self.step < self.total_steps:
                    last_eval = self._run_eval()
                if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == self.total_steps):
                    self.save()
        except KeyboardInterrupt:
            if getattr(self, "_in_update", False):
                log("interrupted during a parameter update: no checkpoint written for it")
            elif cfg.save_every and self.step > start_step:
                log(f"interrupted: saving step {self.step}, the last completed one")
                self.save(rng_at_start)  # the RNG as it was after that step
            raise
        seconds = time.time() - start_time
        log(f"trained {self.step - start_step} steps in {_hms(seconds)}")
        if self.eval_data is not None:
            last_eval = self._run_eval()
        final = None
        if cfg.export:
            final = self.export()
        return {"history": history, "eval": last_eval, "final": final, "seconds": seconds}

    def _run_eval(self) -> dict:
        t0 = time.time()
        result = self.evaluate()
        result = {"step": self.step, **result, "eval_seconds": round(time.time() - t0, 2)}
        self._metrics(result)
        acc = f", exact match {result['exact_match']:.1%}" if "exact_match" in result else ""
        log(f"eval at step {self.step}: loss {result['eval_loss']:.4f}{acc} on {result['eval_examples']} examples")
        for m in result.get("mistakes", [])[:3]:
            log(f"  {m['source']}: {m['query']!r} -> {m['got']!r}, expected {m['expected']!r}")
        return result

    def _truncate_metrics(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in keep))

    def export(self) -> Path:
        """Merge LoRA (in place: the run is over) and write RUN/final in our layout; optionally the hub layout."""
        merged = merge_lora(self.model)
        if merged:
            log(f"merged {len(merged)} LoRA adapters")
        self.model.eval()
        dtype = parse_dtype(self.cfg.export_dtype) or self.source_dtype
        final = save_model(self.model, self.run_dir / "final", self.tokenizer_path, dtype, self.hf_config, force=True)
        log(f"exported {final} ({str(dtype).removeprefix('torch.') if dtype else 'as trained'})")
        if self.cfg.export_hf:
            from .convert import export_hf

            out = export_hf(final, self.cfg.export_hf, force=True)
            log(f"exported {out} (hub layout)")
        return final


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(cfg: TrainConfig) -> dict:
    """Run a fine-tuning job; see `Trainer.run`."""
    return Trainer(cfg).run()


# ======================================================================================================= CLI
FINETUNE_EXAMPLES = """examples:
  cogvlm finetune --model ./cogvlm-chat --data train.jsonl --eval-data eval.jsonl --out runs/x \\
      --preset experts --gradient-checkpointing --batch-size 1 --grad-accum 8 --steps 2000 --save-every 200
  cogvlm finetune --model ./cogvlm-chat --data train.jsonl --out runs/lora --preset lora --lora-rank 16
  cogvlm finetune --resume runs/x            # continue exactly where runs/x stopped
data format (JSONL, one record per line):
  {"image": "images/1.png", "conversations": [{"role": "user", "content": "What is it?"},
                                               {"role": "assistant", "content": "a red circle"}]}
"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None here so that on --resume only the options given on the command line override the saved ones.
    g = p.add_argument_group("model and data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help="converted checkpoint folder to fine-tune")
    src.add_argument("--init", metavar="CONFIG",
                     help="train from scratch: a cogvlm_config.json / hub config.json / preset name, initialised by "
                          "init_weights(seed); the preset defaults to full")
    g.add_argument("--tokenizer", help="tokenizer.model (default: the one in --model, or beside the --init config)")
    g.add_argument("--data", help="training data, JSONL")
    g.add_argument("--eval-data", help="held-out data, JSONL: loss and greedy exact-match accuracy")
    g.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, final/ (required unless --resume RUN)")
    g.add_argument("--template", choices=["chat", "vqa", "base"], help="prompt template (default: the model's)")
    g.add_argument("--all-turns", action="store_true", default=None,
                   help="one example per assistant turn of multi-turn records (default: the last turn only)")
    g.add_argument("--max-length", type=int, help="longest sequence, in tokens (default 2048)")
    g = p.add_argument_group("what trains")
    g.add_argument("--preset", choices=list(PRESETS), help="experts (default: adapter + visual experts), lora, full")
    g.add_argument("--train", action="append", metavar="PATTERN", help="also train parameters matching PATTERN")
    g.add_argument("--freeze", action="append", metavar="PATTERN", help="freeze parameters matching PATTERN")
    g.add_argument("--lora-rank", type=int, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha/rank (default 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0.05)")
    g.add_argument("--lora-targets", nargs="+", metavar="PATTERN",
                   help="linear layers to adapt (default: vision_expert_qkv vision_expert_dense)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 for lora, 1e-5 otherwise)")
    g.add_argument("--min-lr-ratio", type=float, help="final lr of the cosine, as a fraction of --lr (default 0)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices (default 0)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 3%% of the steps)")
    g.add_argument("--steps", type=int, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, help="passes over the data when --steps is not given (default 1)")
    g.add_argument("--batch-size", type=int, help="examples per micro-batch (default 1)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0 = off (default 1.0)")
    g.add_argument("--seed", type=int, help="seed of data order, dropout, LoRA and --init weights (default 0)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute each ViT block / decoder layer in backward (less memory, ~30%% more time)")
    g = p.add_argument_group("device")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", choices=list(DTYPES),
                   help="weights and compute: default bf16 on GPU (with autocast), fp32 on CPU")
    g.add_argument("--trainable-dtype", choices=list(DTYPES),
                   help="dtype of the trained parameters and their AdamW state (default fp32)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g = p.add_argument_group("evaluation, checkpoints, export")
    g.add_argument("--log-every", type=int, help="steps between progress lines on stderr (default 10)")
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default 0: only at the end)")
    g.add_argument("--eval-max-examples", type=int, help="evaluate on at most this many eval examples")
    g.add_argument("--eval-batch-size", type=int, help="(default: --batch-size)")
    g.add_argument("--no-eval-generate", dest="eval_generate", action="store_false", default=None,
                   help="evaluate the loss only (no greedy generation / exact match)")
    g.add_argument("--max-new-tokens", type=int, help="generation limit in evaluation (default 32)")
    g.add_argument("--eval-only", action="store_true",
                   help="no training: print the loss and exact match of --model on --eval-data as JSON")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default 0: none)")
    g.add_argument("--keep-checkpoints", type=int, help="keep the latest N checkpoints (default 2)")
    g.add_argument("--resume", metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its latest checkpoint (or from this checkpoint folder)")
    g.add_argument("--no-export", dest="export", action="store_false", default=None,
                   help="do not write RUN/final at the end")
    g.add_argument("--export-dtype", choices=list(DTYPES), help="dtype of RUN/final (default: the source's)")
    g.add_argument("--export-hf", metavar="DIR", help="also write the final model in the hub layout to DIR")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The options given on the command line; with --resume, the others come from the checkpoint's config."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if args.resume:
        ckpt = find_checkpoint(args.resume)
        saved = read_checkpoint_state(ckpt)["config"]
        if "model" in given:
            saved["init"] = None
        if "init" in given:
            saved["model"] = None
        given = {**saved, **given}
        if args.out is None:
            given["out"] = str(ckpt.parent.parent)  # RUN/checkpoints/step-N -> RUN
    if given.get("init") and "preset" not in given:
        given["preset"] = "full"  # from scratch, everything trains
    for required in ("data", "out"):
        if not given.get(required):
            raise ValueError(f"--{required} is required")
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    return TrainConfig(**given)


def evaluate_only(args: argparse.Namespace) -> dict:
    """`--eval-only`: loss and exact match of the --model checkpoint on --eval-data; no training."""
    if not args.model or not args.eval_data:
        raise ValueError("--eval-only needs --model and --eval-data")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = _resolve_device_dtype(TrainConfig(data="", out="", device=args.device, dtype=args.dtype))
    folder = _resolve_model(args.model, args.tokenizer)
    from .api import CogVLM as WithAPI

    model = WithAPI.from_pretrained(folder, device=device, dtype=dtype)
    tokenizer = Tokenizer(args.tokenizer or folder / TOKENIZER_FILE)
    data = ConversationDataset(args.eval_data, tokenizer, model.cfg.vision.image_size, model.cfg.vision.patch_size,
                               args.template or model.cfg.template_version, args.max_length or 2048,
                               bool(args.all_turns))
    t0 = time.time()
    result = evaluate(model, data, args.eval_batch_size or args.batch_size or 8, args.eval_generate is not False,
                      args.max_new_tokens or 32, args.eval_max_examples,
                      None if dtype == torch.float32 else dtype)
    result["eval_seconds"] = round(time.time() - t0, 2)
    return result


def cmd_finetune(args: argparse.Namespace) -> None:
    if args.eval_only:
        print(json.dumps(evaluate_only(args), indent=2))
        return
    result = train(config_from_args(args))
    if result["final"] is not None:
        print(f"fine-tuned model: {result['final']}", file=sys.stderr)


def add_finetune_command(subparsers) -> argparse.ArgumentParser:
    """Register `cogvlm finetune` on the CLI's subparsers (cli.py: `add_finetune_command(sub)`)."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a converted checkpoint (presets experts / lora / full), or train from scratch",
        description=__doc__.split("\n\n")[0], epilog=FINETUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=cmd_finetune)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogvlm.finetune")
    sub = parser.add_subparsers(dest="command")
    add_finetune_command(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "finetune":
        argv = ["finetune", *argv]
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"cogvlm finetune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
