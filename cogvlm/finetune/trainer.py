"""The training loop: `Trainer` holds a run (model, data, AdamW, schedule) and `run()` trains, evaluates,
checkpoints and exports; `train(cfg)` does all of it.

AdamW with weight decay on matrices only, gradient clipping, linear warmup then cosine decay. The batches of step s
depend only on s and the seed (a fresh permutation per epoch), so a resumed run sees the same batches, learning
rates and dropout masks as an uninterrupted one. With gradient accumulation each micro-batch's mean loss is weighted
1/grad_accum.
`--workers N` prepares the batches in N processes (`loader`); `--max-minutes M` fits the step count to a wall-clock
budget (`budget`).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from ..convert import export_hf
from ..data import ConversationDataset
from ..lora import merge_lora
from ..quantize import dequantize_model
from ..shards import parse_dtype
from ..tokenizer import Tokenizer
from .build import load_base, make_trainable
from .checkpoint import (file_digest, find_checkpoint, list_checkpoints, load_checkpoint, read_checkpoint_state,
                         restore_rng, rng_state, save_checkpoint, save_model)
from .budget import TimeBudget
from .config import DEFAULT_LR, TrainConfig
from .evaluate import autocast, evaluate, to_device, training_loss
from .loader import BatchOrder, batch_stream

PROVISIONAL_STEPS = 10**9  # the step count of a time-budgeted run without --steps, until the budget fits it


def log(msg: str) -> None:
    print(f"[finetune] {msg}", file=sys.stderr, flush=True)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """`lr_factor` as LambdaLR's callable (its state lives in the scheduler's last_epoch)."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.total, self.min_ratio)


class Trainer:
    """Holds a run's model, data, optimizer and schedule; `run()` trains, evaluates, checkpoints and exports."""

    def __init__(self, cfg: TrainConfig):
        self.budget = TimeBudget(cfg.max_minutes) if cfg.max_minutes is not None else None  # (its clock starts now)
        if cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise ValueError("--batch-size and --grad-accum must be >= 1")
        if cfg.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {cfg.workers}")
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.resume_from = find_checkpoint(cfg.resume) if cfg.resume else None
        if self.resume_from is not None:
            diffs = cfg.trajectory_differences(read_checkpoint_state(self.resume_from)["config"])
            if diffs:
                raise ValueError(f"cannot resume from {self.resume_from}: options that change the training differ "
                                 "(pass the same ones, or leave them out on the command line):\n  "
                                 + "\n  ".join(diffs))
        elif list_checkpoints(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds checkpoints; pass --resume {self.run_dir} to continue "
                             "that run, or choose another --out")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device, self.dtype = cfg.device_and_dtype()
        self.autocast_dtype = None if self.dtype == torch.float32 else self.dtype
        if self.autocast_dtype is None and cfg.trainable_dtype != "fp32":
            raise ValueError(f"--trainable-dtype {cfg.trainable_dtype} with fp32 compute (--dtype fp32, the CPU's "
                             "default): the trained weights would be coarser than the arithmetic around them; train "
                             f"them in fp32 (leave --trainable-dtype out) or compute in {cfg.trainable_dtype} "
                             f"(--dtype {cfg.trainable_dtype}, under autocast)")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        base = load_base(cfg, self.device, self.dtype)
        self.model, self.tokenizer_path = base.model, base.tokenizer
        self.hf_config, self.source_dtype = base.hf_config, base.source_dtype
        self.tokenizer = Tokenizer(base.tokenizer)
        self.template = cfg.template or self.model.cfg.template_version
        self.train_data = self._dataset(cfg.data)
        self.eval_data = self._dataset(cfg.eval_data) if cfg.eval_data else None
        if cfg.steps is not None:
            self.total_steps = cfg.steps
        elif cfg.epochs is not None or self.budget is None:
            self.total_steps = math.ceil((cfg.epochs or 1.0) * len(self.train_data) / (cfg.batch_size * cfg.grad_accum))
        else:  # a time budget alone: as many steps as fit
            if cfg.warmup_steps is None:
                raise ValueError("--max-minutes without --steps or --epochs needs --warmup-steps (the default, 3 % of "
                                 "the steps, is not known before the budget fits them)")
            self.total_steps = PROVISIONAL_STEPS
        if self.total_steps < 1:
            raise ValueError("the run has no step to take (check --steps / --epochs)")
        if self.budget is not None and self.total_steps != PROVISIONAL_STEPS:
            self.budget.cap = self.total_steps  # the budget can only shorten the run
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.03 * self.total_steps)
        self.order = BatchOrder(len(self.train_data), cfg.batch_size, cfg.grad_accum, cfg.seed)
        self._stream, self._stream_at = None, None

        self.trainable = make_trainable(self.model, cfg)
        params = dict(self.model.named_parameters())
        decay = [params[n] for n in self.trainable if params[n].dim() >= 2]
        no_decay = [params[n] for n in self.trainable if params[n].dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.preset]
        # fused on GPUs: one kernel per step and no temporary copy of the AdamW state (the foreach version's copy
        # was 12 GiB for the full-size experts preset in bf16)
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(cfg.betas),
                                           fused=self.device.type == "cuda")
        self.schedule = Schedule(self.warmup, self.total_steps, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.step = 0
        self.data_digest = file_digest(cfg.data)

    def _dataset(self, path) -> ConversationDataset:
        mcfg, cfg = self.model.cfg, self.cfg
        return ConversationDataset(path, self.tokenizer, mcfg.vision.image_size, mcfg.vision.patch_size,
                                   self.template, cfg.max_length, cfg.all_turns, cfg.image_cache_mb)

    # -- data order --------------------------------------------------------------------------------------------
    def batch_indices(self, step: int, micro: int) -> list[int]:
        """Examples of micro-batch `micro` of optimizer step `step`: a deterministic walk through per-epoch
        shuffles, so a resumed run sees the same batches."""
        return self.order.indices(step, micro)

    def _micro_batch(self, micro: int) -> dict:
        """Micro-batch `micro` of the current step, from the stream (started, or restarted, where needed)."""
        k = self.step * self.cfg.grad_accum + micro
        if self._stream is None or self._stream_at != k:
            self.close_stream()
            self._stream = batch_stream(self.train_data, self.order, k, self.cfg.workers,
                                        pin_memory=self.device.type == "cuda")
        self._stream_at = k + 1
        return next(self._stream)

    def close_stream(self) -> None:
        """Stop the batch stream (and its worker processes)."""
        if self._stream is not None:
            self._stream.close()
        self._stream, self._stream_at = None, None

    def _set_total(self, total: int) -> None:
        """A new step count (the time budget's fit): the cosine stretches to it, from the next step's lr on."""
        if total == self.total_steps:
            return
        self.total_steps = self.schedule.total = total
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.schedule(self.scheduler.last_epoch)

    # -- one step, one evaluation, one checkpoint ----------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = to_device(self._micro_batch(micro), self.device)
            with autocast(self.device, self.autocast_dtype):
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
        # its own RNG stream: evaluating must not change the dropout masks of the steps after it
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return evaluate(self.model, self.eval_data, self.cfg.eval_batch_size or self.cfg.batch_size,
                            self.cfg.eval_generate, self.cfg.max_new_tokens, self.cfg.eval_max_examples,
                            self.autocast_dtype)

    def save(self, rng=None) -> Path:
        state = {"config": self.cfg.to_json(), "data_sha256": self.data_digest, "total_steps": self.total_steps}
        path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, state, rng,
                               self.cfg.keep_checkpoints)
        log(f"saved checkpoint {path}")
        return path

    def _restore(self) -> None:
        meta = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler)
        if meta.get("data_sha256") and meta["data_sha256"] != self.data_digest:
            log(f"warning: {self.cfg.data} changed since the checkpoint; the run will not continue exactly")
        self.step = meta["step"]
        if self.budget is not None:  # the step count fitted so far (the schedule's copy came with its state)
            self.total_steps = meta.get("total_steps", self.total_steps)
        restore_rng(self.resume_from, meta)
        log(f"resumed from {self.resume_from} at step {self.step}")

    # -- the run -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the last step; returns {"history": [...step records of this invocation], "eval": ...,
        "final": path or None, "seconds": training time}."""
        cfg = self.cfg
        self._start_run()
        history, last_eval, rng_at_start = [], None, None
        start_time = time.time()
        start_step = self.step
        window = []
        try:
            while self.step < self.total_steps:
                rng_at_start = rng_state()
                t0 = time.time()
                rec = self.train_step()
                window.append(time.time() - t0)
                rec["time"] = round(time.time() - start_time, 3)
                history.append(rec)
                self._metrics(rec)
                if self.budget is not None:
                    self._fit_budget()
                if self.step % cfg.log_every == 0 or self.step in (start_step + 1, self.total_steps):
                    per_step = sum(window) / len(window)
                    window = []
                    eta = per_step * (self.total_steps - self.step)
                    if self.budget is not None:
                        eta = max(0.0, min(eta, self.budget.left()))
                    total = "?" if self.total_steps == PROVISIONAL_STEPS else self.total_steps
                    log(f"step {self.step}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
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
        finally:
            self.close_stream()
        seconds = time.time() - start_time
        log(f"trained {self.step - start_step} steps in {_hms(seconds)}")
        if self.eval_data is not None:
            last_eval = self._run_eval()
        final = self.export() if cfg.export else None
        return {"history": history, "eval": last_eval, "final": final, "seconds": seconds}

    def _fit_budget(self) -> None:
        measured = self.budget.rate is not None
        total = self.budget.fit(self.step, self.total_steps)
        if total == self.step and self.step < self.total_steps:
            log(f"time budget of {self.cfg.max_minutes:g} min spent: stopping after step {self.step}")
        self._set_total(total)
        if not measured and self.budget.rate is not None:
            log(f"time budget: {self.total_steps} steps fit in the {self.budget.left():.0f} s left "
                f"({self.budget.rate:.3f} s/step so far); the schedule follows")

    def _start_run(self) -> None:
        """Restore a resumed run (and drop its metrics after the checkpoint), write the run's options, say what
        trains."""
        cfg, metrics = self.cfg, self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            self._restore()
            if metrics.exists():
                lines = [line for line in metrics.read_text().splitlines() if line.strip()]
                metrics.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= self.step))
        elif metrics.exists():
            metrics.unlink()  # a new run in a folder without checkpoints starts afresh
        (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        log(f"{cfg.preset}: training {n_train:,} of {n_all:,} parameters ({len(self.trainable)} tensors) on "
            f"{self.device} ({str(self.dtype).removeprefix('torch.')}{', autocast' if self.autocast_dtype else ''}); "
            f"{len(self.train_data)} examples, {self._planned()}, "
            f"lr {self.lr:g}, warmup {self.warmup}")

    def _planned(self) -> str:
        steps = f"steps of {self.cfg.batch_size}x{self.cfg.grad_accum}"
        if self.budget is None:
            return f"{self.total_steps} {steps}"
        cap = "" if self.total_steps == PROVISIONAL_STEPS else f", at most {self.total_steps}"
        return f"{steps}, as many as fit in the {self.budget.left():.0f} s left of {self.cfg.max_minutes:g} min{cap}"

    def _metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

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

    def export(self) -> Path:
        """Merge LoRA (in place: the run is over) and write RUN/final in our layout; optionally the hub layout."""
        merged = merge_lora(self.model)
        if merged:
            log(f"merged {len(merged)} LoRA adapters")
        if dequantize_model(self.model):  # a quantized base is exported dequantized, the adapters merged into it
            log("exported the quantized base dequantized (cogvlm quantize can quantize the export again)")
        self.model.eval()
        dtype = parse_dtype(self.cfg.export_dtype) or self.source_dtype
        final = save_model(self.model, self.run_dir / "final", self.tokenizer_path, dtype, self.hf_config, force=True)
        log(f"exported {final} ({str(dtype).removeprefix('torch.') if dtype else 'as trained'})")
        if self.cfg.export_hf:
            out = export_hf(final, self.cfg.export_hf, force=True)
            log(f"exported {out} (hub layout)")
        return final


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(cfg: TrainConfig) -> dict:
    """Run a fine-tuning job; see `Trainer.run`."""
    return Trainer(cfg).run()
