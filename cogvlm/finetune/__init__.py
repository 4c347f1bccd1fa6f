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
patterns are described in `cogvlm/swap.py`.

The package, in the order a run uses it:
- `config`: `TrainConfig`, every option of a run, and the presets;
- `build`: the base model (`load_base`: a converted checkpoint, or `build_model`/`init_weights` from scratch) and
  what of it trains (`select_trainable`, `set_gradient_checkpointing`);
- `checkpoint`: training checkpoints (only what trains, AdamW, scheduler and RNG states; resumed exactly) and
  `save_model`, the whole model in our converted layout;
- `evaluate`: `training_loss` (the model's own shifted cross-entropy over labelled tokens, without the logits of
  the image and prompt positions) and `evaluate` (that loss on held-out data, and the exact-match accuracy of greedy
  answers from `cogvlm.generate`);
- `loader`: the order of the examples and the stream of batches, made in the training process or in `--workers`
  data worker processes (the same batches either way);
- `budget`: `--max-minutes`, a wall-clock budget to which the step count (and so the schedule) is fitted;
- `trainer`: `Trainer` and `train(cfg)`: the loop, its schedule, logging, checkpoints and the final export.
The command line is `cogvlm/cli/finetune.py`. See docs/finetune.md.
"""
from .build import (Base, build_model, init_weights, load_base, make_trainable, select_trainable,
                    set_gradient_checkpointing)
from .checkpoint import (checkpoint_dtype, find_checkpoint, list_checkpoints, load_checkpoint, read_checkpoint_state,
                         save_checkpoint, save_model)
from .config import DEFAULT_LR, PRESETS, TrainConfig
from .evaluate import evaluate, evaluate_checkpoint, generate_answers, training_loss
from .trainer import Trainer, lr_factor, train

__all__ = [
    "Base", "DEFAULT_LR", "PRESETS", "TrainConfig", "Trainer", "build_model", "checkpoint_dtype", "evaluate",
    "evaluate_checkpoint", "find_checkpoint", "generate_answers", "init_weights", "list_checkpoints",
    "load_base", "load_checkpoint", "lr_factor", "make_trainable", "read_checkpoint_state", "save_checkpoint",
    "save_model", "select_trainable", "set_gradient_checkpointing", "train", "training_loss",
]
