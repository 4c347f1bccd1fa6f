"""The two model folders the tiny-ground training starts from (see README.md here).

    python examples/tiny-ground/make_init.py fresh CONFIG TOKENIZER OUT [--seed S]
        `cogvlm.finetune.init_weights(seed)` everywhere (what `cogvlm finetune --init` does), except the ViT's patch
        position embeddings, which start as a 2-D sine-cosine code of the patch's row and column, so that a place
        is linearly readable from the first step (they stay trainable).
    python examples/tiny-ground/make_init.py checkpoint CKPT BASE OUT
        a `--preset full` training checkpoint (every parameter) over the model folder BASE, as a model folder: the
        start of the next stage, whose new schedule and data `--resume` would not allow.
"""
from __future__ import annotations

import argparse
import math

import torch

from cogvlm import CogVLM
from cogvlm.finetune import build_model, save_model
from cogvlm.shards import read_tensors


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim), row-major patches: half the channels code the row, half the column, as sin/cos of dim/4
    frequencies from pi/(2*grid) (nearly linear across the grid) to pi per patch; each channel standardised."""
    pos = torch.arange(grid, dtype=torch.float64)
    freqs = math.pi * torch.logspace(-math.log2(2 * grid), 0, dim // 4, base=2, dtype=torch.float64)
    axis = torch.cat([torch.sin(pos[:, None] * freqs), torch.cos(pos[:, None] * freqs)], 1)  # (grid, dim/2)
    code = torch.cat([axis[:, None, :].expand(grid, grid, -1), axis[None, :, :].expand(grid, grid, -1)], -1)
    code = code.reshape(grid * grid, dim)
    return ((code - code.mean(0)) / code.std(0).clamp_min(1e-6)).float()


def fresh(config: str, tokenizer: str, out: str, seed: int) -> None:
    model = build_model(config, seed)
    pos = model.vision.patch_embed.pos_embed  # (1 + grid^2, D): cls first, its row left as drawn
    grid = math.isqrt(pos.shape[0] - 1)
    with torch.no_grad():
        pos[1:] = sincos_2d(grid, pos.shape[1])
    save_model(model, out, tokenizer=tokenizer, dtype=torch.float32)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters, {grid}x{grid} patches")


def from_checkpoint(ckpt: str, base: str, out: str) -> None:
    model = CogVLM.from_pretrained(base, device="cpu", dtype=torch.float32)
    tensors = read_tensors(ckpt, "trainable")
    missing = sorted(set(model.state_dict()) - set(tensors))
    if missing:
        raise ValueError(f"{ckpt} lacks {len(missing)} tensors (e.g. {missing[0]}): not a --preset full checkpoint")
    model.load_state_dict(tensors, strict=False)
    save_model(model, out, tokenizer=f"{base}/tokenizer.model", dtype=torch.float32)
    print(f"wrote {out} from {ckpt}")


def main() -> None:
    p = argparse.ArgumentParser(prog="make_init.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("fresh")
    f.add_argument("config"), f.add_argument("tokenizer"), f.add_argument("out")
    f.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("checkpoint")
    c.add_argument("ckpt"), c.add_argument("base"), c.add_argument("out")
    args = p.parse_args()
    if args.mode == "fresh":
        fresh(args.config, args.tokenizer, args.out, args.seed)
    else:
        from_checkpoint(args.ckpt, args.base, args.out)


if __name__ == "__main__":
    main()
