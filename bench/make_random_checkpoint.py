"""Write a random-weight CogVLM checkpoint in the hub layout (`THUDM/cogvlm-*-hf` names, shapes, sharding).

    python bench/make_random_checkpoint.py OUT [--preset cogvlm-chat-hf] [--shards 8] [--dtype bf16]

Tensors are drawn on the GPU when there is one (fast) and written shard by shard, so memory stays near one shard.
Used to check conversion (peak RSS, time) and loading at full size without downloading the real weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.random_weights import init_  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.convert import expected_shapes, name_table  # noqa: E402
from cogvlm.shards import DTYPES  # noqa: E402
from cogvlm.convert.names import hub_buffers  # noqa: E402
from cogvlm.llm import rope_inv_freq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    args = ap.parse_args()
    cfg, dtype = CogVLMConfig.from_name(args.preset), DTYPES[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = expected_shapes(cfg)
    hub: list[tuple[str, tuple, str]] = []  # (hub name, shape, our name for the init rule)
    for e in name_table(cfg):
        shape = list(shapes[e.ours])
        shape[0] //= len(e.hub)
        hub += [(h, tuple(shape), e.ours) for h in e.hub]
    hub += [(name, shape, "inv_freq") for name, shape in hub_buffers(cfg).items()]
    total = sum(torch.Size(s).numel() for _, s, _ in hub) * torch.finfo(dtype).bits // 8
    per_shard = total / args.shards
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shard, shard_bytes, weight_map, index = {}, 0, {}, 1

    def flush():
        nonlocal shard, shard_bytes, index
        name = f"model-{index:05d}-of-{args.shards:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        print(f"wrote {name} ({shard_bytes / 2**30:.2f} GiB)", file=sys.stderr)
        shard, shard_bytes, index = {}, 0, index + 1

    for name, shape, ours in hub:
        if ours == "inv_freq":
            t = rope_inv_freq(cfg.text.head_dim, cfg.text.rope_theta)
        else:
            t = init_(ours, torch.empty(shape, device=device, dtype=torch.float32), gen)
        shard[name] = t.to(dtype).cpu()
        shard_bytes += shard[name].numel() * shard[name].element_size()
        if shard_bytes >= per_shard and index < args.shards:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))


if __name__ == "__main__":
    main()
