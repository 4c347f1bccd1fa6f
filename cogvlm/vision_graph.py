"""The vision tower (ViT + adapter) of a few images replayed from a CUDA graph.

For one image the tower is ~700-1000 kernels (compiled / eager); on an H200 launching them kept the host ~1.5 ms
behind the GPU (21.5 ms of GPU time in a 23.0 ms call, compiled layers; docs/benchmarks.md). Its shapes are fixed
for a batch size (the image size is the config's), so one CUDA graph per batch size replays the whole tower with a
single launch. `graph_vision(model)` puts a `VisionGraphs` in front of `model.encode_images` on the instance (the
model files are untouched; a decode session with CUDA graphs does it); each batch size is recorded on its first
call (after one run on a side stream: compilation, autotuning and cuDNN plans happen there, outside the capture).

It applies to inference only: CUDA pixels of at most MAX_IMAGES images (beyond, the GPU time dwarfs the launches), no
autograd, no trace, eval mode, no hooks on the tower's modules (a replay would skip them), the tower on the pixels'
device. Anything else runs the ordinary path. `cogvlm.kept.release_session` (quantization, compilation) drops the
graphs, and so does a move of the weights. COGVLM_VISION_GRAPH=0 turns it off.
"""
from __future__ import annotations

import os
import threading

import torch
from torch import nn

from .kept import KEPT_VISION_GRAPHS

MAX_IMAGES = 4


class VisionGraphs:
    def __init__(self, model: nn.Module):
        self.model = model
        self.eager = type(model).encode_images.__get__(model)  # the class's method, whatever the instance holds
        self.graphs: dict[tuple, tuple] = {}  # (pixels' shape, dtype, weights' place) -> (graph, input, output)
        self.lock = threading.Lock()  # one caller at a time fills the static input and reads the output

    def __call__(self, pixel_values: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        if not self.applies(pixel_values, trace):
            return self.eager(pixel_values, trace)
        key = (tuple(pixel_values.shape), pixel_values.dtype, self.place())
        with self.lock:
            if key not in self.graphs:
                self.graphs = {k: v for k, v in self.graphs.items() if k[2] == key[2]}  # weights moved: old go
                self.graphs[key] = self.capture(pixel_values)
            graph, static_in, static_out = self.graphs[key]
            static_in.copy_(pixel_values)
            graph.replay()
            return static_out.clone()

    def place(self) -> tuple:
        """Where the tower's first and last weights are: they change when the model is moved or its weights replaced."""
        first = self.model.vision.patch_embed.proj.weight
        last = next(reversed(list(self.model.adapter.parameters())), first)
        return first.device, first.data_ptr(), last.data_ptr()

    def applies(self, pixels: torch.Tensor, trace) -> bool:
        model = self.model
        if (os.environ.get("COGVLM_VISION_GRAPH", "1") == "0" or trace is not None or not pixels.is_cuda
                or pixels.shape[0] > MAX_IMAGES or torch.is_grad_enabled() or model.training
                or torch.cuda.is_current_stream_capturing()):
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        tower = [*model.vision.modules(), *model.adapter.modules()]
        if any(m._forward_hooks or m._forward_pre_hooks for m in tower):
            return False
        return model.vision.patch_embed.proj.weight.device == pixels.device

    def capture(self, pixels: torch.Tensor) -> tuple:
        static_in = pixels.clone()
        side = torch.cuda.Stream(pixels.device)
        side.wait_stream(torch.cuda.current_stream(pixels.device))
        with torch.cuda.stream(side):
            self.eager(static_in)  # warm-up, outside the capture
        torch.cuda.current_stream(pixels.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.eager(static_in)
        return graph, static_in, static_out


def graph_vision(model: nn.Module) -> None:
    """Replay `model`'s vision tower from CUDA graphs where it applies (see the module's doc); idempotent."""
    if KEPT_VISION_GRAPHS not in model.__dict__:
        graphs = VisionGraphs(model)
        model.__dict__[KEPT_VISION_GRAPHS] = graphs
        model.encode_images = graphs


def ungraph_vision(model: nn.Module) -> None:
    """Back to the ordinary `encode_images`, freeing the graphs."""
    model.__dict__.pop(KEPT_VISION_GRAPHS, None)
    model.__dict__.pop("encode_images", None)
