"""A decode step cut at the device boundaries of a map, one CUDA graph per piece (issue 18).

A CUDA graph is captured on one device, so a model spread by a device map decodes eagerly (DecodeSession turns
graphs off when the parameters span devices): every step pays its hundreds of kernel launches and a Python hook per
block, which is what makes a 2-GPU split several times slower than one GPU at batch 1. Here the decode path
(llm.embed, llm.layers.*, llm.norm, llm.lm_head; a decode step is text only, so the ViT and adapter never run) is
cut into *segments*, maximal runs of consecutive blocks on one device (`segments`). Each segment reads one static
input (the token ids for the first, the previous segment's output for the others), keeps its own copy of the
step's small state (which cache slots hold tokens, the slot and rotary position of the next token) and advances it
in place, and writes one static output. A step is then: run segment 0, copy its (B, 1, D) output to segment 1's
device (the only transfer), run segment 1, and so on; on a GPU each run is one graph replay.

The pieces compute exactly what `CogVLM.forward` computes for a cached text step, with the model's own modules and
functions, so the tokens equal the unsegmented model's (tested on the CPU, where the pieces run eagerly).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fusion import fused_kernels
from ..llm import KVCache, attention_mask, rope_tables
from ..model import CogVLM


@dataclass
class Segment:
    device: torch.device
    blocks: list[str]  # consecutive blocks of the decode path, in order


def decode_devices(model: CogVLM) -> dict[str, torch.device]:
    """The blocks a decode step runs through, in order, each with the device its weights are on."""
    names = ["llm.embed"] + [f"llm.layers.{i}" for i in range(len(model.llm.layers))] + ["llm.norm", "llm.lm_head"]
    return {name: next(model.get_submodule(name).parameters()).device for name in names}


def segments(devices: dict[str, torch.device]) -> list[Segment]:
    """Maximal runs of consecutive blocks on one device (`devices`: block -> device in decode order). A device may
    hold several segments ({layers.0-15: 0, layers.16-31: 1, lm_head: 0} gives three): each is captured apart."""
    out: list[Segment] = []
    for name, device in devices.items():
        if out and out[-1].device == device:
            out[-1].blocks.append(name)
        else:
            out.append(Segment(device, [name]))
    return out


class Piece:
    """One segment of the step: its modules, its copy of the step state, its static input and output."""

    def __init__(self, model: CogVLM, segment: Segment, caches: list[KVCache], state: tuple | None):
        self.model, self.device, self.blocks = model, segment.device, segment.blocks
        self.layers = [int(b.rsplit(".", 1)[1]) for b in segment.blocks if b.startswith("llm.layers.")]
        self.caches = caches
        self.state = state  # (key_valid, cache_pos, next_pos) on this device, or None for a piece without layers
        self.input: torch.Tensor | None = None  # the static input buffer (the token ids for the first piece)
        self.output: torch.Tensor | None = None
        self.graph = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CogVLM.forward of a cached text step (no token types: no image, no expert route), cut to these blocks."""
        llm, cfg = self.model.llm, self.model.llm.cfg
        if self.state is not None:
            key_valid, cache_pos, next_pos = self.state
            key_valid.index_fill_(1, cache_pos, True)  # the slot written this step becomes visible
        if "llm.embed" in self.blocks:
            x = llm.embed(x).float()  # the residual stream is fp32, as in LanguageModel.forward
        if self.layers:
            rope = rope_tables(next_pos, cfg.head_dim, cfg.rope_theta)
            mask = attention_mask(cache_pos, key_valid, self.caches[self.layers[0]].k.shape[2])
            for i in self.layers:
                x = llm.layers[i](x, rope, None, mask, self.caches[i], cache_pos)
        if "llm.norm" in self.blocks:
            x = llm.norm(x)
        if "llm.lm_head" in self.blocks:
            x = llm.lm_head(x).float()[:, -1]  # (B, V) logits of the one new position
        if self.state is not None:
            cache_pos += 1
            next_pos += 1
        return x

    def capture(self) -> None:
        """Warm up on a side stream (cuBLAS and allocator set-up, compiled kernels), undo the warm-up's state
        changes (the cache slot it wrote is written again by the first replay), then capture one graph."""
        saved = [t.clone() for t in self.state or ()]
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), fused_kernels():
                self.forward(self.input)
            torch.cuda.current_stream().wait_stream(stream)
            for buf, old in zip(self.state or (), saved):
                buf.copy_(old)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), fused_kernels():
                self.output = self.forward(self.input)

    def run(self, use_graph: bool) -> torch.Tensor:
        if not (use_graph and self.device.type == "cuda"):
            self.output = self.forward(self.input)
            return self.output
        if self.graph is None:
            self.capture()
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.output


class SegmentedStep:
    """A decode step over a model whose decode path spans devices: one piece per segment, each its own CUDA graph
    on a GPU (`cuda_graph`, default: on when any piece is on a GPU), eager on the CPU.

    It works on a decode session's buffers: `caches` (one per layer, on its layer's device), `key_valid` (B, S),
    `cache_pos` (1,), `next_pos` (B, 1) and `tokens` (B, 1), all on the device of llm.embed; the first piece advances
    those, each later piece with layers its own copy. Call `sync()` after every prefill (the copies follow the
    session's state), then `step(tokens)` once per new token; it returns the (B, V) fp32 logits, a static buffer
    when the last piece is a graph (overwritten by the next step). `cuts` replaces the per-device segments by a finer
    cut of the same path (several graphs on one device; the tests use it to split a CPU-only model)."""

    def __init__(self, model: CogVLM, caches: list[KVCache], key_valid: torch.Tensor, cache_pos: torch.Tensor,
                 next_pos: torch.Tensor, tokens: torch.Tensor, cuda_graph: bool | None = None,
                 cuts: list[Segment] | None = None):
        path = decode_devices(model)
        segs = cuts or segments(path)
        if [(b, s.device) for s in segs for b in s.blocks] != list(path.items()):
            raise ValueError("the segments must cover the decode path in order, each block on its weights' device")
        if segs[0].device != tokens.device or not any(b.startswith("llm.layers.") for b in segs[0].blocks):
            raise ValueError(f"llm.embed and llm.layers.0 must be on the session's device ({tokens.device}); "
                             f"the decode path starts {', '.join(segs[0].blocks)} on {segs[0].device}")
        self.session_state = (key_valid, cache_pos, next_pos)
        self.pieces = []
        for k, seg in enumerate(segs):
            has_layers = any(b.startswith("llm.layers.") for b in seg.blocks)
            state = None if not has_layers else self.session_state if k == 0 else tuple(
                torch.empty_like(t, device=seg.device) for t in self.session_state)
            self.pieces.append(Piece(model, seg, caches, state))
        self.pieces[0].input = tokens
        self.use_graph = any(s.device.type == "cuda" for s in segs) if cuda_graph is None else cuda_graph
        self.sync()

    def sync(self) -> None:
        """Copy the session's state into the later pieces' copies (after a prefill, or a reset)."""
        for piece in self.pieces[1:]:
            for mine, source in zip(piece.state or (), self.session_state):
                mine.copy_(source)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); the logits (B, V) for the next one."""
        self.pieces[0].input.copy_(tokens.view(-1, 1))
        x = self.pieces[0].run(self.use_graph)
        for piece in self.pieces[1:]:
            if piece.input is None:
                piece.input = torch.empty_like(x, device=piece.device)  # static: a graph reads this buffer
            piece.input.copy_(x)  # the hand-over: device to device, asynchronous to the host on GPUs
            x = piece.run(self.use_graph)
        return x
