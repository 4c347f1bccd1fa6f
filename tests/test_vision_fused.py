"""The ViT MLP with its GELU in fc1's epilogue (`cogvlm.vision_fused`): the swap keeps the weights and names, the
ordinary exact MLP runs wherever the fused product does not apply, and the fused product computes fc1 + GELU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cogvlm.config import VisionConfig
from cogvlm.vision_fused import GeluEpilogueMLP, _linear_gelu_op, fuse_vision_gelu, linear_gelu
from cogvlm.vit import VisionMLP, VisionTransformer


def small_tower() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = VisionConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_heads=4, image_size=28,
                       patch_size=14, num_positions=5)
    holder = torch.nn.Module()
    holder.vision = VisionTransformer(cfg)
    for p in holder.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return holder


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_swap_keeps_weights_and_runs_the_exact_mlp_off_cuda():
    model = small_tower()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = model.vision(images, torch.float32)
        names = fuse_vision_gelu(model)
        assert names == ["vision.layers.0.mlp", "vision.layers.1.mlp"]
        assert fuse_vision_gelu(model) == []  # idempotent
        assert all(type(model.get_submodule(n)) is GeluEpilogueMLP for n in names)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        mlp = model.get_submodule(names[0])
        assert isinstance(mlp, VisionMLP) and not mlp.fused(torch.randn(3, 32))  # CPU: the exact MLP
        assert torch.equal(model.vision(images, torch.float32), want)


def test_fused_product_is_fc1_then_gelu():
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    w, b = torch.randn(48, 32, dtype=torch.bfloat16) * 0.2, torch.randn(48, dtype=torch.bfloat16)
    got = linear_gelu(x, w, b)
    want = F.gelu(F.linear(x.float(), w.float(), b.float()))  # the exact GELU in fp32
    assert got.shape == (2, 5, 48) and got.dtype == torch.bfloat16
    assert rel(got, want) < 2 * torch.finfo(torch.bfloat16).eps
    torch.library.opcheck(_linear_gelu_op, (x.view(-1, 32), w, b))  # the op compiled layers trace (schema, fake)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's epilogue needs a GPU")
def test_cuda_mlp_takes_the_fused_path_only_where_it_applies():
    model = small_tower().cuda().to(torch.bfloat16)
    fuse_vision_gelu(model)
    mlp = model.vision.layers[0].mlp
    x = torch.randn(3, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert mlp.fused(x)
        want = mlp.fc2(F.gelu(mlp.fc1(x.float().bfloat16())))
        assert rel(mlp(x), want) < 2 * torch.finfo(torch.bfloat16).eps
    assert not mlp.fused(x.float()) and not mlp.fused(x.requires_grad_())
