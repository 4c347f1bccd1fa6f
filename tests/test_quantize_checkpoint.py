"""`cogvlm quantize`: a quantized checkpoint written once loads as it is and computes what on-the-fly quantization
computes; bad input gives one clear error and leaves nothing behind."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvlm import CogVLM
from cogvlm.cli import main as cli_main
from cogvlm.cli import quantize as quantize_command
from cogvlm.cli.options import UsageError
from cogvlm.quantize import Int4Linear, Int8Linear
from cogvlm.quantize.checkpoint import quantize_checkpoint
from cogvlm.shards import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPES = ROOT / "examples" / "tiny-shapes"
HUB_FIXTURE = ROOT / "tests" / "fixtures" / "hf_reference" / "model"


def command():
    """The command module and a parser holding only it (independent of its registration in cogvlm.cli)."""
    parser = argparse.ArgumentParser(prog="cogvlm")
    quantize_command.add_parser(parser.add_subparsers(dest="command"))
    return quantize_command, parser


def logits(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    n = model.cfg.num_image_tokens
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.zeros(2, n, dtype=torch.long),
                     torch.randint(100, 32000, (2, 9), generator=g)], 1)
    types = torch.zeros_like(ids)
    types[:, 1:1 + n] = 1
    pixels = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size, generator=g)
    with torch.no_grad():
        return model(ids, types, pixel_values=pixels).logits


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32)])
def test_round_trip_written_checkpoint_equals_on_the_fly(tmp_path, mode, group_size):
    module, parser = command()
    dst = tmp_path / f"tiny-{mode}"
    argv = ["quantize", str(TINY_SHAPES), str(dst), "--mode", mode] + (["--group-size", "32"] if group_size else [])
    assert module.run(parser.parse_args(argv)) is None
    meta = json.loads((dst / "cogvlm_config.json").read_text())["quantization"]
    assert (meta["mode"], meta["group_size"], meta["quantize_vision"]) == (mode, group_size, True)
    assert "llm.layers.1.mlp.language_expert.down" in meta["modules"]
    assert "llm.lm_head" in meta["modules"]  # in int8 under both modes
    assert (dst / "tokenizer.model").exists()
    stored = {}
    for f in dst.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    layer = "llm.layers.0.attn.language_expert_qkv"
    assert stored[f"{layer}.weight"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert stored["llm.lm_head.weight"].dtype == torch.int8
    assert stored[f"{layer}.scales"].dtype == torch.bfloat16
    assert stored["llm.embed.weight"].dtype == torch.float16  # the rest as the source stores it
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    source = sum(f.stat().st_size for f in TINY_SHAPES.glob("*.safetensors"))
    assert size < source  # (embeddings and lm_head, 90 % of this tiny model, stay fp16)

    loaded = CogVLM.from_pretrained(dst, device="cpu", dtype=torch.float32)  # no quantize option: from the file
    on_the_fly = CogVLM.from_pretrained(TINY_SHAPES, device="cpu", dtype=torch.float32, quantize=mode,
                                        group_size=group_size)
    assert isinstance(loaded.llm.layers[0].attn.language_expert_qkv, Int8Linear if mode == "int8" else Int4Linear)
    assert loaded.quantization == on_the_fly.quantization
    assert torch.equal(logits(loaded), logits(on_the_fly))
    state = on_the_fly.state_dict()  # what the loaded model holds is what was written, bit for bit
    assert all(torch.equal(state[k].to(v.dtype), v) for k, v in stored.items() if not v.is_floating_point())
    assert loaded.chat(ROOT / "examples" / "images" / "shape0.png", "Describe the image.") == "a blue triangle"


def test_quantizing_a_hub_layout_folder_equals_quantizing_its_conversion(tmp_path):
    from cogvlm.convert import convert

    direct = quantize_checkpoint(HUB_FIXTURE, tmp_path / "direct", "int4", 32, quantize_vision=False)
    converted = quantize_checkpoint(convert(HUB_FIXTURE, tmp_path / "conv"), tmp_path / "via", "int4", 32,
                                    quantize_vision=False)
    a, b = (CogVLM.from_pretrained(p, device="cpu", dtype=torch.float32) for p in (direct, converted))
    assert type(a.vision.layers[0].mlp.fc1) is torch.nn.Linear  # --no-quantize-vision
    assert torch.equal(logits(a), logits(b))


def test_an_int4_checkpoint_written_before_lm_head_was_quantized_loads_with_its_lm_head_as_stored(tmp_path):
    """Until the sixteenth session (2026-12-04) int4 kept lm_head in the compute dtype: such a folder's config does not
    list it, and it loads as it was written (the module list, not today's defaults, decides what is swapped)."""
    dst = quantize_checkpoint(TINY_SHAPES, tmp_path / "q", "int4", 32)
    config = json.loads((dst / "cogvlm_config.json").read_text())
    config["quantization"]["modules"].remove("llm.lm_head")
    (dst / "cogvlm_config.json").write_text(json.dumps(config))
    source = {}
    for f in TINY_SHAPES.glob("*.safetensors"):
        source.update(load_file(str(f)))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"].pop("llm.lm_head.scales")
    tensors = load_file(str(shard))
    del tensors["llm.lm_head.scales"]
    tensors["llm.lm_head.weight"] = source["llm.lm_head.weight"]
    save_file(tensors, str(shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))

    model = CogVLM.from_pretrained(dst, device="cpu", dtype=torch.float32)
    assert type(model.llm.lm_head) is torch.nn.Linear
    assert torch.equal(model.llm.lm_head.weight, source["llm.lm_head.weight"].float())
    assert isinstance(model.llm.layers[0].attn.language_expert_qkv, Int4Linear)


def test_a_missing_scale_is_named(tmp_path):
    dst = quantize_checkpoint(TINY_SHAPES, tmp_path / "q", "int8")
    shard = next(dst.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    del tensors["llm.layers.1.attn.vision_expert_dense.scales"]
    save_file(tensors, str(shard))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    del index["weight_map"]["llm.layers.1.attn.vision_expert_dense.scales"]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): llm.layers.1.attn.vision_expert_dense.scales"):
        CogVLM.from_pretrained(dst, device="cpu")


def test_bad_requests_fail_before_anything_is_written(tmp_path):
    module, parser = command()
    dst = tmp_path / "out"
    cases = [
        (["--mode", "int4", "--group-size", "64"], ValueError,
         "64 does not divide the 96 input features of adapter.gate_up; choose --group-size 32"),
        (["--mode", "int8", "--group-size", "64"], UsageError, "is for --mode int4"),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            module.run(parser.parse_args(["quantize", str(TINY_SHAPES), str(dst)] + extra))
        assert list(tmp_path.iterdir()) == []  # no destination, no temporary folder
    with pytest.raises(SystemExit):  # argparse: not one of the supported sizes
        parser.parse_args(["quantize", str(TINY_SHAPES), str(dst), "--mode", "int4", "--group-size", "48"])
    done = quantize_checkpoint(TINY_SHAPES, tmp_path / "q", "int8")
    with pytest.raises(CheckpointError, match=r"already quantized \(int8, ViT quantized\)"):
        quantize_checkpoint(done, dst, "int4")
    with pytest.raises(CheckpointError, match="already quantized.*load it without quantize options"):
        CogVLM.from_pretrained(done, device="cpu", quantize="int4")
    with pytest.raises(FileExistsError, match="already exists"):
        quantize_checkpoint(TINY_SHAPES, done, "int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_the_command_parses_without_torch():
    code = ("import sys, argparse; from cogvlm.cli import quantize as m; p = argparse.ArgumentParser(); "
            "m.add_parser(p.add_subparsers()); p.parse_args(['quantize', 'a', 'b', '--mode', 'int4']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_the_option_choices_are_the_library_ones():
    from cogvlm import quantize
    from cogvlm.cli import options

    assert options.QUANTIZE_CHOICES == quantize.MODES and options.GROUP_SIZE_CHOICES == quantize.GROUP_SIZES


def test_ask_quantizes_on_the_fly_and_rejects_options_without_quantize(capsys):
    image = str(ROOT / "examples" / "images" / "shape0.png")
    base = ["ask", "--model", str(TINY_SHAPES), "--device", "cpu", "--quiet", image, "Describe the image."]
    assert cli_main(base + ["--quantize", "int4", "--group-size", "32"]) == 0
    assert capsys.readouterr().out == "a blue triangle\n"
    assert cli_main(base + ["--quantize", "int4"]) == 1  # group 128 does not divide the tiny model's width 96
    assert "128 does not divide the 64 input features of vision.layers.0.attn.qkv" in capsys.readouterr().err
    assert cli_main(base + ["--group-size", "32"]) == 2
    assert "--group-size is for --quantize int4" in capsys.readouterr().err
