"""One decode step in its CUDA graph: the model's own step, the Triton step (`cogvlm.fast_decode`), and the Triton
step with programmatic dependent launch (`cogvlm.decode_kernels.launch_options`), side by side on one card.

    python bench/decode_step.py [--preset cogvlm-chat-hf] [--modes bf16 int8 int4-g128] [--batches 1 8] [--steps 64]

Full-size random bf16 weights (bench/random_weights.py), made again for each mode (the same seed) and quantized
for int8 / int4-g128 as `quantize_model` + `pack_model` do at load. Each variant gets its own decode session (its
own graph) after the same prefill (one image + 24 text tokens); a step's time is the median over three runs of
`--steps` steps between CUDA events, each variant timed twice in turn (the spread between the two is the noise).
The floor: the language-path weights as held (`bench.bench.language_path_bytes`) plus the batch's KV cache, read
once per step at the copy bandwidth measured in the same run. Agreement: the logits of 8 steps fed the same tokens,
each variant against the model's own step (relative error, and how often the top token is the same).
The last column: microseconds per token of `generate_tokens` in the PDL variant's session, as a streaming caller
sees them (the step plus the loop's work around it: the token's choice and its copy to the host).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import commit, copy_bandwidth, cuda_time, language_path_bytes, make_prompt  # noqa: E402
from bench.random_weights import random_model  # noqa: E402
from cogvlm import decode_kernels  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.generate import DecodeSession, generate_tokens  # noqa: E402

VARIANTS = {"model step": ("0", False), "Triton step": ("1", False), "Triton step + PDL": ("1", True)}


def session(model, variant: str, prompt, length: int) -> DecodeSession:
    """A decode session of this variant, prefilled with the prompt, its graph captured."""
    kernels, decode_kernels.PDL = VARIANTS[variant]
    before = os.environ.get("COGVLM_DECODE_KERNELS")
    os.environ["COGVLM_DECODE_KERNELS"] = kernels  # read when the session builds its step
    try:
        s = DecodeSession(model, prompt[0].shape[0], length)
        s.prefill(prompt[0], prompt[1], pixel_values=prompt[2])
        s.step(torch.zeros(prompt[0].shape[0], dtype=torch.long, device="cuda"))  # captures the graph
    finally:
        os.environ.pop("COGVLM_DECODE_KERNELS") if before is None else os.environ.update(
            COGVLM_DECODE_KERNELS=before)
    return s


def logits(s: DecodeSession, prompt, tokens: torch.Tensor) -> torch.Tensor:
    """(steps, B, V) logits of the steps after a fresh prefill, fed `tokens` (steps, B)."""
    s.reset()
    s.prefill(prompt[0], prompt[1], pixel_values=prompt[2])
    return torch.stack([s.step(t).float() for t in tokens])


def step_time(s: DecodeSession, prompt_len: int, steps: int) -> float:
    tok = torch.zeros(s.batch_size, dtype=torch.long, device="cuda")

    def run():
        s.length = prompt_len + 1  # rewind the host counter; slots past the prompt are rewritten
        s.cache_pos.fill_(prompt_len + 1)
        for _ in range(steps):
            s.step(tok)

    return cuda_time(run, warmup=1, iters=3) / steps


def loop_time(s: DecodeSession, prompt, steps: int) -> float:
    """Seconds per token of `generate_tokens` in this session (greedy, no eos), from the first token reaching the
    host to the last, as a streaming caller sees them: the step plus the loop's own work around it."""
    stamps = [time.perf_counter() for _ in generate_tokens(s.model, prompt[0], prompt[1], pixel_values=prompt[2],
                                                           max_new_tokens=steps + 1, eos_id=-1, session=s)]
    return (stamps[-1] - stamps[0]) / steps


def measure(model, cfg, mode: str, batches, steps: int, bandwidth: float) -> list[dict]:
    rows = []
    kv_per_token = 2 * cfg.text.num_hidden_layers * cfg.text.hidden_size * 2
    for batch in batches:
        prompt = make_prompt(cfg, batch, 24)
        L = prompt[0].shape[1]
        sessions = {v: session(model, v, prompt, L + steps + 1) for v in VARIANTS}
        g = torch.Generator().manual_seed(1)
        feed = torch.randint(100, cfg.text.vocab_size, (8, batch), generator=g).cuda()
        ref = logits(sessions["model step"], prompt, feed)
        floor = (language_path_bytes(model) + batch * (L + steps) * kv_per_token) / bandwidth
        times = {v: [] for v in VARIANTS}
        for _ in range(2):
            for v, s in sessions.items():
                times[v].append(step_time(s, L, steps))
        loop = min(loop_time(sessions["Triton step + PDL"], prompt, steps) for _ in range(3))
        for v, s in sessions.items():
            got = logits(s, prompt, feed)
            t = min(times[v])
            rows.append({"mode": mode, "batch": batch, "variant": v, "triton": s.fast is not None, "step_us": t * 1e6,
                         "spread_us": abs(times[v][0] - times[v][1]) * 1e6, "tok_s": batch / t,
                         "of_floor": floor / t, "rel_err": ((got - ref).norm() / ref.norm()).item(),
                         "top1_same": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                         "loop_us": loop * 1e6 if v == "Triton step + PDL" else None})
        del sessions
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--modes", nargs="+", default=["bf16", "int8"],
                    choices=["bf16", "int8", "int8-bf16-head", "int4-g128", "int4-g128-bf16-head"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    from cogvlm.quantize import QuantSpec, pack_model, quantize_model

    bandwidth = copy_bandwidth()
    cfg = CogVLMConfig.from_name(args.preset)
    rows = []
    with torch.no_grad():
        for mode in args.modes:  # each from the same random bf16 weights (seed 0)
            model = random_model(cfg)
            if mode != "bf16":
                kind, *group = mode.removesuffix("-bf16-head").split("-g")
                head = model.llm.lm_head
                quantize_model(model, QuantSpec(kind, int(group[0]) if group else None, True, None))
                if mode.endswith("-bf16-head"):  # lm_head kept in bf16 (as before the 14th session for int8, 16th int4)
                    model.llm.lm_head = head
                pack_model(model, torch.bfloat16)
            rows += measure(model, cfg, mode, args.batches, args.steps, bandwidth)
            del model
            torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, commit {commit()}, copy {bandwidth / 1e9:.0f} GB/s")
    print("| mode | batch | step | us | spread | tok/s | of floor | logits vs model step | top-1 same | "
          "us per token in generate_tokens |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        fell_back = r["triton"] != (r["variant"] != "model step")
        variant = r["variant"] + (" (NOT RUN: fell back)" if fell_back else "")
        print(f"| {r['mode']} | {r['batch']} | {variant} | {r['step_us']:.0f} | {r['spread_us']:.0f} | "
              f"{r['tok_s']:.1f} | {r['of_floor']:.0%} | {r['rel_err']:.2e} | {r['top1_same']:.0%} | "
              f"{'' if r['loop_us'] is None else round(r['loop_us'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit(), "copy_GBps": bandwidth / 1e9, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
