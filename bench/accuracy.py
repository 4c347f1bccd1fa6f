"""bf16 against fp32 on the same weights: the error of our logits, eager and with compiled layers, on two kinds of
image (issue 7's protocol; issue 16's check that speed work costs no accuracy).

    python bench/accuracy.py [--preset cogvlm-chat-hf] [--json OUT]          # one GPU (also: bench.py --accuracy)
    python bench/accuracy.py --device cpu --preset examples/tiny-shapes --eager-only     # a CPU smoke run

Full widths, 32 decoder and 24 ViT layers (so that the fp32 model fits beside the bf16 run), random weights
(bench/random_weights.py, seed 1: drawn in fp32 and rounded to bf16, so both runs hold the same weights), one image
and 300 random text tokens. Images: "pictures" (smooth gradients with flat rectangles, `bench.bench.synthetic_images`)
and "noise" (uniform white noise through the CLIP normalisation, an unusually hard input). For each kind and each
way of running the bf16 model (eager layers, then `cogvlm.speed.compile_layers`): the relative error of all logits
and of the text positions', top-1 agreement at the text positions, and the error after every stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import make_prompt  # noqa: E402
from bench.random_weights import random_model  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.image import CLIP_MEAN, CLIP_STD  # noqa: E402
from cogvlm.speed import compile_layers  # noqa: E402


def inputs(cfg: CogVLMConfig, device: str) -> dict[str, tuple]:
    ids, types, pictures = make_prompt(cfg, 1, 300, seed=2, device=device)
    g = torch.Generator().manual_seed(3)
    S = cfg.vision.image_size
    noise = (torch.rand(1, 3, S, S, generator=g) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(
        CLIP_STD).view(3, 1, 1)
    return {"pictures": (ids, types, pictures.float()), "noise": (ids, types, noise.to(device))}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compare(out, ref, trace, ref_trace, types) -> dict:
    text = types[0] == 0
    stages = {k: relative(trace[k].cpu(), ref_trace[k]) for k in ref_trace if k.endswith("out") or k == "inputs_embeds"}
    return {"rel_err_all": relative(out, ref), "rel_err_text": relative(out[text], ref[text]),
            "top1_agree_text": (out[text].argmax(-1) == ref[text].argmax(-1)).float().mean().item(),
            "stage_rel_err": stages}


def run(preset: str, device: str, eager_only: bool) -> dict:
    cfg = CogVLMConfig.load(preset)
    cfg.text.num_hidden_layers, cfg.vision.num_hidden_layers = 32, 24
    model = random_model(cfg, device=device, dtype=torch.float32, seed=1)
    data = inputs(cfg, device)
    refs = {}
    with torch.no_grad():
        for kind, (ids, types, pixels) in data.items():
            trace: dict = {}
            logits = model(ids, types, pixel_values=pixels, trace=trace).logits[0].cpu()
            refs[kind] = logits, {k: v.cpu() for k, v in trace.items()}
        model.set_dtype(torch.bfloat16)
        r: dict = {"card": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                   "torch": torch.__version__, "preset": preset,
                   # whether this torch's inductor has its own switch that keeps bf16 addmm fused (cogvlm.speed)
                   "inductor_has_keep_addmm_fused": hasattr(inductor, "keep_addmm_fused_for_half_dtypes")}
        for label in ("eager", "compiled"):
            if label == "compiled":
                if eager_only:
                    break
                compile_layers(model)
            for kind, (ids, types, pixels) in data.items():
                trace = {}
                out = model(ids, types, pixel_values=pixels.bfloat16(), trace=trace).logits[0].cpu()
                r[f"{label}_{kind}"] = compare(out, refs[kind][0], trace, refs[kind][1], types.cpu())
    return r


def print_table(r: dict) -> None:
    print("| bf16 vs fp32 | all logits | text logits | top-1 agreement, text |\n| --- | ---: | ---: | ---: |")
    for key, m in r.items():
        if isinstance(m, dict) and "rel_err_all" in m:
            print(f"| {key.replace('_', ', ')} | {m['rel_err_all'] * 100:.2f} % | {m['rel_err_text'] * 100:.2f} % | "
                  f"{m['top1_agree_text'] * 100:.1f} % |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvlm-chat-hf", help="a preset name or a config file/folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eager-only", action="store_true", help="no compiled layers (a CPU smoke run)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32 (the conv too)
    torch.backends.cudnn.allow_tf32 = False
    r = run(args.preset, args.device, args.eager_only)
    r["date"], r["command"] = time.strftime("%Y-%m-%d"), " ".join(sys.argv)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    print_table(r)


if __name__ == "__main__":
    main()
