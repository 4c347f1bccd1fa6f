"""Where the time goes: torch.profiler over one batch-1 prefill and a few eager decode steps (full size, random bf16).

    python bench/profile_steps.py [--preset cogvlm-chat-hf] [--rows 25]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import make_prompt  # noqa: E402
from bench.random_weights import random_model  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.generate import DecodeSession  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    cfg = CogVLMConfig.from_name(args.preset)
    model = random_model(cfg)
    ids, types, pixels = make_prompt(cfg, 1, 24)
    session = DecodeSession(model, 1, ids.shape[1] + 64, cuda_graph=False)
    with torch.no_grad():
        for _ in range(2):  # warm-up
            session.prefill(ids, types, pixel_values=pixels)
            tok = torch.zeros(1, dtype=torch.long, device="cuda")
            session.step(tok)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            session.prefill(ids, types, pixel_values=pixels)
            torch.cuda.synchronize()
        print("== prefill (batch 1, one image + 24 text tokens)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                session.step(tok)
            torch.cuda.synchronize()
        print("== 10 eager decode steps (batch 1)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
