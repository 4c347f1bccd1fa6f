"""Full-size conversion check: convert a hub-layout checkpoint in a subprocess (peak RSS, time), load it on the GPU,
run one forward pass (one image + a short prompt) and time it.

    python bench/convert_check.py HUB_DIR OUT_DIR [--dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import cuda_time, make_prompt  # noqa: E402
from cogvlm import CogVLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hub")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    shards = sorted(Path(args.hub).glob("*.safetensors"))
    r = {"input_shards": len(shards), "largest_input_shard_GB": max(f.stat().st_size for f in shards) / 1e9,
         "input_GB": sum(f.stat().st_size for f in shards) / 1e9}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cogvlm", "convert", args.hub, args.out, "--dtype", args.dtype, "--force"],
                   check=True)
    r["convert_s"] = time.perf_counter() - t0
    r["convert_peak_rss_GB"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    out_shards = sorted(Path(args.out).glob("*.safetensors"))
    r["largest_output_shard_GB"] = max(f.stat().st_size for f in out_shards) / 1e9

    t0 = time.perf_counter()
    model = CogVLM.from_pretrained(args.out, device="cuda", dtype=args.dtype)
    torch.cuda.synchronize()
    r["load_s"] = time.perf_counter() - t0
    r["load_peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    r["gpu_weights_GB"] = torch.cuda.memory_allocated() / 1e9
    ids, types, pixels = make_prompt(model.cfg, 1, 24)
    with torch.no_grad():
        logits = model(ids, types, pixel_values=pixels, last_logits_only=True).logits
        r["forward_ms"] = cuda_time(lambda: model(ids, types, pixel_values=pixels, last_logits_only=True)) * 1e3
    r["logits_finite"] = bool(logits.isfinite().all())
    r["logits_std"] = logits.std().item()
    r["card"] = torch.cuda.get_device_name()
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
