"""Peak memory and time of one fine-tuning optimizer step, per preset, on the full-size model with random weights.

    python bench/finetune_step.py                      # cogvlm-chat-hf sizes on cuda, bf16, gradient checkpointing
    python bench/finetune_step.py --cases experts:fp32 experts:bf16 lora:fp32 --no-gradient-checkpointing
    python bench/finetune_step.py --config tiny --device cpu      # a seconds-long smoke test of this script

Each case (PRESET:TRAINABLE_DTYPE) runs in its own process so that its peak memory is its own and an
out-of-memory case does not disturb the others. The model is built on the meta device and materialised on the
GPU in bf16 (random N(0, 0.02) weights, norms 1), the preset selects what trains (the trained tensors are cast to
TRAINABLE_DTYPE, as `cogvlm finetune --trainable-dtype` does), and one batch of `--batch-size` rows, each one
image (490 px: 1227 image positions) plus a prompt and an answer, goes through the trainer's own loss
(`cogvlm.finetune.training_loss`) under bf16 autocast, then backward, gradient clipping and an AdamW step.
Step 1 allocates the AdamW state; steps 2..N are timed and the peak memory over all steps is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cogvlm.config import CogVLMConfig, TextConfig, VisionConfig  # noqa: E402
from cogvlm.finetune import TrainConfig, make_trainable, training_loss  # noqa: E402
from cogvlm import CogVLM  # noqa: E402
from cogvlm.meta import meta_device  # noqa: E402

DEFAULT_CASES = ["experts:fp32", "experts:bf16", "lora:fp32", "full:fp32"]


def config(name: str) -> CogVLMConfig:
    if name == "tiny":
        return CogVLMConfig(
            text=TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2),
            vision=VisionConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_hidden_layers=2,
                                image_size=56, num_positions=17))
    return CogVLMConfig.from_name(name)


def random_model(cfg: CogVLMConfig, device: torch.device, dtype: torch.dtype) -> CogVLM:
    with meta_device():
        model = CogVLM(cfg).set_dtype(dtype)  # dtype first, on meta: the GPU never holds an fp32 copy
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.requires_grad_(False)
    return model


def batch(cfg: CogVLMConfig, batch_size: int, prompt_len: int, answer_len: int, device) -> dict:
    n_img = cfg.num_image_tokens
    L = 1 + n_img + prompt_len + answer_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.text.vocab_size, (batch_size, L), generator=g)
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = 0
    types = torch.zeros(batch_size, L, dtype=torch.long)
    types[:, 1:1 + n_img] = 1
    labels = torch.full((batch_size, L), -100, dtype=torch.long)
    labels[:, L - answer_len:] = ids[:, L - answer_len:]
    size = cfg.vision.image_size
    return {
        "input_ids": ids.to(device), "token_type_ids": types.to(device),
        "attention_mask": torch.ones(batch_size, L, dtype=torch.long, device=device), "labels": labels.to(device),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=g).to(device),
    }


def one_case(args) -> dict:
    preset, _, tdtype = args.one.partition(":")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = config(args.config)
    result = {"case": args.one, "config": args.config, "device": str(device), "batch_size": args.batch_size,
              "gradient_checkpointing": not args.no_gradient_checkpointing}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    model = random_model(cfg, device, dtype)
    names = make_trainable(model, TrainConfig(  # what the trainer does with these options
        data="", out="", preset=preset, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
        trainable_dtype=tdtype or "fp32", gradient_checkpointing=not args.no_gradient_checkpointing))
    params = dict(model.named_parameters())
    trainable = [params[n] for n in names]
    result["trainable_params"] = sum(p.numel() for p in trainable)
    result["total_params"] = sum(p.numel() for p in model.parameters())
    result["build_seconds"] = round(time.time() - t0, 1)
    if device.type == "cuda":
        result["weights_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")  # as the trainer
    data = batch(cfg, args.batch_size, args.prompt_len, args.answer_len, device)
    result["seq_len"] = data["input_ids"].shape[1]
    times = []
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.time()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = training_loss(model, data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.time() - t)
        result.setdefault("losses", []).append(round(loss.item(), 4))
    result["first_step_seconds"] = round(times[0], 3)
    if len(times) > 1:
        result["step_seconds"] = round(sum(times[1:]) / len(times[1:]), 3)
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cogvlm-chat-hf", help="preset name (cogvlm-chat-hf, ...) or 'tiny'")
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="PRESET:TRAINABLE_DTYPE (fp32 or bf16)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=24, help="text tokens after the image")
    p.add_argument("--answer-len", type=int, default=32, help="labelled tokens at the end")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the first is not timed)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    if args.one:
        try:
            result = one_case(args)
        except torch.cuda.OutOfMemoryError as e:
            result = {"case": args.one, "error": "out of memory", "detail": str(e).splitlines()[0]}
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--one", case] + [a for a in sys.argv[1:] if a not in args.cases
                                                           and a != "--cases"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if lines:
            results.append(json.loads(lines[-1][7:]))
        else:
            results.append({"case": case, "error": f"exit {proc.returncode}", "detail": proc.stderr[-2000:]})
        r = results[-1]
        if "error" in r:
            print(f"{case:14s} {r['error']}: {r.get('detail', '')[:300]}", flush=True)
        else:
            print(f"{case:14s} trainable {r['trainable_params'] / 1e6:9.1f}M of {r['total_params'] / 1e6:.0f}M  "
                  f"seq {r['seq_len']}  peak {r.get('peak_gib', '-')} GiB  step {r.get('step_seconds', '-')} s  "
                  f"(first {r['first_step_seconds']} s, build {r['build_seconds']} s)  loss {r['losses']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
