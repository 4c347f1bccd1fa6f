"""The vision tower replayed from CUDA graphs (`cogvlm.vision_graph`): where it must not apply it must leave
`encode_images` exactly as it was, and whatever changes the layers must drop recorded graphs. The replay itself needs
a GPU (the last test; on the CPU it is skipped and checked by bench runs on an H200 instead)."""
from __future__ import annotations

import pytest
import torch

from cogvlm.kept import release_session
from cogvlm.vision_graph import KEPT_VISION_GRAPHS, VisionGraphs, graph_vision, ungraph_vision


@pytest.fixture(scope="module")
def model_and_pixels():
    from tests.test_fast_decode import fixture_model

    model, t, _ = fixture_model()
    return model, t["pixel_values"].to(model.dtype)


def test_cpu_pixels_take_the_ordinary_path(model_and_pixels):
    model, pixels = model_and_pixels
    with torch.no_grad():
        want = model.encode_images(pixels)
        graph_vision(model)
        graph_vision(model)  # idempotent: one wrapper
        assert isinstance(model.encode_images, VisionGraphs) and model.__dict__[KEPT_VISION_GRAPHS] is model.encode_images
        assert not model.encode_images.applies(pixels, None)  # CPU pixels
        assert torch.equal(model.encode_images(pixels), want)
        assert model.__dict__[KEPT_VISION_GRAPHS].graphs == {}  # nothing recorded
        ungraph_vision(model)
        assert "encode_images" not in model.__dict__ and torch.equal(model.encode_images(pixels), want)


def test_changes_to_the_layers_drop_recorded_graphs(model_and_pixels):
    from cogvlm.swap import set_submodule

    model, _ = model_and_pixels
    graph_vision(model)
    try:
        graphs = model.__dict__[KEPT_VISION_GRAPHS]
        graphs.graphs["recorded"] = object()
        release_session(model)  # quantization and compilation call it
        assert graphs.graphs == {}
        graphs.graphs["recorded"] = object()
        name = "vision.layers.0.mlp.fc1"
        set_submodule(model, name, model.get_submodule(name))  # any module swap (LoRA, quantized layers)
        assert graphs.graphs == {}
    finally:
        ungraph_vision(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replay_equals_the_ordinary_tower_on_cuda(model_and_pixels):
    model, pixels = model_and_pixels
    model = model.cuda()
    try:
        for batch in (1, 2):
            x = pixels.cuda().expand(batch, -1, -1, -1).contiguous() * torch.linspace(0.5, 1, batch, device="cuda")[
                :, None, None, None]
            with torch.no_grad():
                want = model.encode_images(x)
                graph_vision(model)
                first, again = model.encode_images(x), model.encode_images(x * 0.5)
                assert len(model.__dict__[KEPT_VISION_GRAPHS].graphs) >= 1
                assert torch.equal(first, want)
                ungraph_vision(model)
                assert torch.equal(again, model.encode_images(x * 0.5))
                handle = model.vision.layers[0].register_forward_hook(lambda *a: None)
                graph_vision(model)
                assert not model.encode_images.applies(x, None)  # a hook would be skipped by a replay
                handle.remove()
                ungraph_vision(model)
    finally:
        model.cpu()
