"""cogvlm.speed: compiled ViT blocks and decoder layers give the eager model's answers, one compiled graph serves every
block of a kind, a compiler failure falls back to eager, and the switch is undone cleanly (CPU)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from cogvlm import CogVLM
from cogvlm.chat import build_batch, pixels_of
from cogvlm.speed import compile_layers, compile_wanted, is_compiled, uncompile_layers
import cogvlm.speed as speed

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny-shapes"
IMAGES = sorted((REPO / "examples" / "images").iterdir())
QUESTIONS = ["Describe the image.", "What shape is it?", "What colour is the shape?"]


@pytest.fixture
def model():
    m = CogVLM.from_pretrained(TINY, device="cpu", dtype=torch.float32)
    yield m
    uncompile_layers(m)


def prompt_logits(model, images, questions):
    batch = build_batch(model, [Image.open(p) for p in images], questions)
    with torch.no_grad():
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                     batch["pixel_values"]).logits


class Counting:
    """A torch.compile backend that runs the graph as traced and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_one_graph_serves_every_block_and_answers_do_not_change(model):
    torch._dynamo.reset()
    images = IMAGES[:3]
    eager_logits = prompt_logits(model, images, QUESTIONS)
    eager = model.chat_batch(images, QUESTIONS, max_new_tokens=6)
    backend = Counting()
    compile_layers(model, backend=backend)
    assert is_compiled(model)
    assert model.chat_batch(images, QUESTIONS, max_new_tokens=6) == eager
    torch.testing.assert_close(prompt_logits(model, images, QUESTIONS), eager_logits, rtol=0, atol=0)
    # Whatever the depth: the ViT block, the decoder prefill (padded rows, a batch of 3) and the decode step.
    depth = len(model.vision.layers) + len(model.llm.layers)
    assert 0 < backend.graphs <= 6 < depth * 2


def test_inductor_layers_give_the_eager_answers(model):
    torch._dynamo.reset()
    images = IMAGES[:2]
    eager_logits = prompt_logits(model, images, QUESTIONS[:2])
    eager = model.chat_batch(images, QUESTIONS[:2], max_new_tokens=6)
    compile_layers(model)
    assert model.chat_batch(images, QUESTIONS[:2], max_new_tokens=6) == eager
    torch.testing.assert_close(prompt_logits(model, images, QUESTIONS[:2]), eager_logits, rtol=1e-4, atol=1e-4)


def test_a_failing_compiler_warns_once_and_runs_eagerly(model, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(speed, "_failed", set())
    eager = model.chat(IMAGES[0], QUESTIONS[0], max_new_tokens=6)

    def broken(gm, example_inputs):
        raise RuntimeError("no code generator here")

    compile_layers(model, backend=broken)
    with pytest.warns(UserWarning, match="torch.compile of VisionBlock failed"):
        assert model.chat(IMAGES[0], QUESTIONS[0], max_new_tokens=6) == eager
    assert speed._failed == {"VisionBlock", "DecoderLayer"}


def test_uncompile_restores_the_plain_forward(model):
    compile_layers(model, backend=Counting())
    uncompile_layers(model)
    assert not is_compiled(model)
    assert all("forward" not in block.__dict__ for block in [*model.vision.layers, *model.llm.layers])


def test_compile_is_wanted_only_for_cuda_models(model, monkeypatch):
    assert not compile_wanted(model)  # a CPU model: compiling would cost more than it saves
    assert not compile_wanted(object())  # (a stand-in without parameters)
    monkeypatch.setenv("COGVLM_COMPILE", "0")
    assert not compile_wanted(model)


def test_pixels_given_as_a_tensor_are_taken_as_preprocessed(model):
    size = model.cfg.vision.image_size
    pixels = torch.randn(3, size, size)
    assert pixels_of(pixels, size) is pixels
    for bad in (torch.randn(3, size + 1, size), torch.zeros(3, size, size, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"preprocessed pixels \(3, "):
            pixels_of(bad, size)


def test_caption_no_compile_keeps_the_layers_eager(tmp_path, monkeypatch):
    """`cogvlm caption --no-compile` turns compilation off for the job (COGVLM_COMPILE=0, which torchrun ranks inherit
    too); without it the job's own rule applies (compile on a GPU)."""
    import cogvlm.caption as caption_job
    from cogvlm.cli import build_parser
    from cogvlm.cli import caption as caption_cli

    seen = []
    monkeypatch.setattr(caption_job, "run_caption_job", lambda *a, **k: seen.append(os.environ.get("COGVLM_COMPILE")))
    monkeypatch.setenv("COGVLM_COMPILE", "1")  # (monkeypatch puts the user's value back afterwards)
    for extra in ([], ["--no-compile"]):
        args = build_parser().parse_args(["caption", str(tmp_path), "--out", str(tmp_path / "c.jsonl"), *extra])
        caption_cli.run(args)
    assert seen == ["1", "0"]


def test_half_precision_addmm_is_never_split_from_its_bias():
    """Inductor's rewrite of addmm into matmul + bias add (GPU only) rounds the bf16 product before the bias: the
    wrapped check refuses bf16/fp16 biases, defers to the original for fp32, and wraps each entry once."""
    from types import SimpleNamespace

    from torch._inductor.fx_passes import post_grad

    from cogvlm.speed import gate_half_dtypes, keep_addmm_fused

    real = [e for entries in post_grad.pass_patterns[2].patterns.values() for e in entries
            if getattr(e, "handler", None) is post_grad.unfuse_bias_add_to_pointwise]
    assert real, "this torch no longer has the rewrite where cogvlm.speed looks for it"
    keep_addmm_fused()
    import torch._inductor.config as inductor
    assert getattr(inductor, "keep_addmm_fused_for_half_dtypes", True) is True

    asked = []
    original = lambda match: asked.append(match) or True  # noqa: E731 - the rewrite's own check: "split it"
    def handler(*args):
        pass
    entry, other = SimpleNamespace(handler=handler, extra_check=original), SimpleNamespace(handler=None,
                                                                                          extra_check=original)
    patterns = SimpleNamespace(patterns={"addmm": [entry, other]})
    assert gate_half_dtypes(patterns, handler) == 1
    assert gate_half_dtypes(patterns, handler) == 0  # not wrapped twice
    assert other.extra_check is original

    def match(dtype):
        return SimpleNamespace(kwargs={"inp": SimpleNamespace(meta={"val": torch.zeros(2, dtype=dtype)})})
    assert entry.extra_check(match(torch.bfloat16)) is False
    assert entry.extra_check(match(torch.float16)) is False
    assert not asked
    assert entry.extra_check(match(torch.float32)) is True and len(asked) == 1
