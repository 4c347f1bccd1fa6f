"""A fine-tuning run's options (`TrainConfig`) and the presets that name what trains."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loading import default_dtype
from ..lora import DEFAULT_TARGETS
from ..shards import parse_dtype

# Which parameters each preset trains, as name patterns (`cogvlm.swap`); everything else is frozen.
PRESETS = {
    "experts": (  # the paper's recipe: the adapter and every decoder layer's visual expert
        "llm.layers.*.attn.vision_expert_qkv",
        "llm.layers.*.attn.vision_expert_dense",
        "llm.layers.*.mlp.vision_expert",
        "adapter",
    ),
    "lora": (),  # only the adapters' lora_A / lora_B, on `lora_targets`
    "full": ("*",),
}
DEFAULT_LR = {"experts": 1e-5, "lora": 2e-4, "full": 1e-5}


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
    quantize: str | None = None  # QLoRA: the frozen base quantized to int8 / int4 (cogvlm.quantize), --preset lora
    group_size: int | None = None  # its int4 group size (default 128)
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
    image_cache_mb: float = 1024  # per process: each data worker has its own cache
    workers: int = 0  # data worker processes preparing the next batches (0: in the training process)
    max_minutes: float | None = None  # wall-clock budget: the step count is fitted to it (cogvlm.finetune.budget)

    # Options that change the trajectory: a resumed run must use the checkpoint's values.
    TRAJECTORY = ("model", "init", "preset", "train", "freeze", "lora_rank", "lora_alpha", "lora_dropout",
                  "lora_targets", "quantize", "group_size", "lr", "min_lr_ratio", "weight_decay", "betas", "warmup_steps", "steps", "epochs",
                  "batch_size", "grad_accum", "max_grad_norm", "seed", "template", "all_turns", "max_length",
                  "dtype", "trainable_dtype")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def trajectory_differences(self, saved: dict) -> list[str]:
        """The TRAJECTORY options where this config differs from `saved` (a checkpoint's `to_json()`), as lines."""
        diffs = []
        for key in self.TRAJECTORY:
            now = getattr(self, key)
            now = list(now) if isinstance(now, tuple) else now
            if key in ("model", "init") and now is not None and saved.get(key) is not None:
                same = Path(now).resolve() == Path(saved[key]).resolve()
            else:
                same = now == saved.get(key)
            if not same:
                diffs.append(f"{key}: checkpoint {saved.get(key)!r}, now {now!r}")
        return diffs

    def device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        """The training device (default cuda when there is one) and weight/compute dtype (default bf16 on GPUs)."""
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return device, parse_dtype(self.dtype) or default_dtype(device)
