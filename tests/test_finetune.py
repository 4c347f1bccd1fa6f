"""cogvlm.finetune and cogvlm.data: presets, loss, gradient checkpointing, exact resume, export, data errors, and
the shipped tiny Shapes model."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cogvlm import shapes
from cogvlm.config import CogVLMConfig, TextConfig, VisionConfig
from cogvlm.convert import convert
from cogvlm.data import ConversationDataset, DataError, Example, collate, read_jsonl
from cogvlm.cli.finetune import add_parser as add_finetune_command, config_from_args
from cogvlm.finetune import (
    TrainConfig, Trainer, build_model, generate_answers, init_weights, select_trainable, set_gradient_checkpointing,
    train, training_loss,
)
from cogvlm.image import preprocess
from cogvlm.lora import LoRALinear
from cogvlm import CogVLM
from cogvlm.layout import image_token_count
from cogvlm.prompt import build_inputs
from cogvlm.tokenizer import Tokenizer

ROOT = Path(__file__).parent.parent
FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
TOKENIZER_MODEL = Path(
    os.environ.get("COGVLM_TOKENIZER", Path(__file__).parent / "fixtures" / "tokenizer" / "tokenizer.model")
)
TINY_SHAPES = ROOT / "examples" / "tiny-shapes"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER_MODEL)


@pytest.fixture(scope="module")
def fixture_model_dir(tmp_path_factory) -> Path:
    """The reference fixture checkpoint, converted (fp32) with the tokenizer."""
    out = tmp_path_factory.mktemp("ft") / "converted"
    return convert(FIXTURES / MANIFEST.get("model_dir", "model"), out, dtype="fp32", tokenizer=TOKENIZER_MODEL)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return shapes.generate(tmp_path_factory.mktemp("ft") / "shapes", n=8, seed=0, min_side=40, max_side=60)


def tiny_config() -> CogVLMConfig:
    return CogVLMConfig(
        text=TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_hidden_layers=2, image_size=28,
                            num_positions=5),
    )


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> Path:
    """A config file for a from-scratch model, with the tokenizer beside it."""
    folder = tmp_path_factory.mktemp("ft") / "tiny"
    folder.mkdir()
    (folder / "cogvlm_config.json").write_text(json.dumps(tiny_config().to_dict()))
    shutil.copyfile(TOKENIZER_MODEL, folder / "tokenizer.model")
    return folder / "cogvlm_config.json"


# ============================================================================================== presets
def test_presets_train_exactly_the_intended_parameters(fixture_model_dir):
    model = CogVLM.from_pretrained(fixture_model_dir, device="cpu", dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    n_layers = model.cfg.text.num_hidden_layers
    experts = {f"llm.layers.{i}.{k}" for i in range(n_layers) for k in (
        "attn.vision_expert_qkv.weight", "attn.vision_expert_dense.weight",
        "mlp.vision_expert.gate_up.weight", "mlp.vision_expert.down.weight")}
    adapter = {n for n in names if n.startswith("adapter.")}
    assert adapter == {"adapter.proj.weight", "adapter.norm.weight", "adapter.norm.bias", "adapter.gate_up.weight",
                       "adapter.down.weight", "adapter.boi", "adapter.eoi"}
    trainable = select_trainable(model, "experts")
    assert set(trainable) == experts | adapter
    assert {n for n, p in model.named_parameters() if p.requires_grad} == experts | adapter
    assert not any(n.startswith("vision.") or "language_expert" in n for n in trainable)

    assert set(select_trainable(model, "full")) == set(names)
    got = select_trainable(model, "experts", train=["llm.norm", "vision.layers[1]"], freeze=["adapter"])
    assert set(got) == experts | {"llm.norm.weight"} | {n for n in names if n.startswith("vision.layers.1.")}
    with pytest.raises(ValueError, match="matches no parameter"):
        select_trainable(model, "experts", train=["vision_experts_qkv"])
    with pytest.raises(ValueError, match="unknown preset"):
        select_trainable(model, "everything")

    lora = select_trainable(model, "lora", lora_targets=["vision_expert_qkv", "vision_expert_dense"])
    assert set(lora) == {f"llm.layers.{i}.attn.{k}.lora_{x}" for i in range(n_layers)
                         for k in ("vision_expert_qkv", "vision_expert_dense") for x in "AB"}


def test_an_experts_step_changes_only_adapter_and_experts(fixture_model_dir, shapes_data, tmp_path):
    trainer = Trainer(TrainConfig(data=str(shapes_data), out=str(tmp_path / "run"), model=str(fixture_model_dir),
                                  preset="experts", steps=1, batch_size=3, lr=1e-2, export=False, dtype="fp32"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    # The last layer's vision-expert dense and MLP only shape the last hidden states of image positions, which
    # nothing reads: their gradient is exactly zero. Every other trainable tensor moves, and nothing else does.
    last = trainer.model.cfg.text.num_hidden_layers - 1
    dead = {f"llm.layers.{last}.attn.vision_expert_dense.weight", f"llm.layers.{last}.mlp.vision_expert.gate_up.weight",
            f"llm.layers.{last}.mlp.vision_expert.down.weight"}
    assert changed == set(trainer.trainable) - dead
    assert all(n.startswith("adapter.") or ".vision_expert" in n for n in changed)


# ================================================================================================= loss
def test_training_loss_matches_the_model_loss(fixture_model_dir, tok, shapes_data):
    model = CogVLM.from_pretrained(fixture_model_dir, device="cpu", dtype=torch.float32)
    ds = ConversationDataset(shapes_data, tok, model.cfg.vision.image_size, model.cfg.vision.patch_size)
    text = ConversationDataset([Example("Say hi, please.", "hi there", [("q", "a")])], tok, 56, 14)
    items = [ds[0], text[0], ds[4]]  # image, text-only, image rows; different lengths -> right padding
    batch = collate(items, tok.pad_id)
    assert batch["pixel_values"].shape[0] == 2 and not batch["attention_mask"].all()
    loss, n = training_loss(model, batch)
    # Independent reference: the full logits of every position, shifted, cross-entropy ignoring -100.
    logits = model(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "pixel_values")}).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                            ignore_index=-100)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(fixture_model_dir, tok, shapes_data):
    model = CogVLM.from_pretrained(fixture_model_dir, device="cpu", dtype=torch.float32).train()
    model.requires_grad_(True)
    ds = ConversationDataset(shapes_data, tok, model.cfg.vision.image_size, model.cfg.vision.patch_size)
    batch = ds.batch([0, 1, 5])

    def grads(enabled):
        set_gradient_checkpointing(model, enabled)
        model.zero_grad(set_to_none=True)
        training_loss(model, batch)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert model.vision.gradient_checkpointing and model.llm.gradient_checkpointing
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


# ======================================================================================= resume & export
def test_resumed_run_continues_the_same_loss_curve(tiny_init, shapes_data, tmp_path):
    common = dict(data=str(shapes_data), init=str(tiny_init), preset="full", steps=6, batch_size=4, grad_accum=2,
                  lr=3e-3, warmup_steps=2, seed=7, dtype="fp32", log_every=100, export=False)
    full = train(TrainConfig(out=str(tmp_path / "a"), save_every=3, keep_checkpoints=5, **common))
    assert [r["step"] for r in full["history"]] == [1, 2, 3, 4, 5, 6]
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000003"
    resumed = train(TrainConfig(out=str(tmp_path / "b"), resume=str(ckpt), save_every=3, **common))
    assert [r["step"] for r in resumed["history"]] == [4, 5, 6]
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full["history"][3:]]  # bit for bit
    assert [r["lr"] for r in resumed["history"]] == [r["lr"] for r in full["history"][3:]]
    with safe_open(str(tmp_path / "a/checkpoints/step-00000006/trainable-00000.safetensors"), "pt") as fa, \
            safe_open(str(tmp_path / "b/checkpoints/step-00000006/trainable-00000.safetensors"), "pt") as fb:
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    # a run folder with checkpoints is not silently overwritten, and resume options must match
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(TrainConfig(out=str(tmp_path / "a"), **common))
    with pytest.raises(ValueError, match="lr: checkpoint 0.003, now 0.001"):
        Trainer(TrainConfig(out=str(tmp_path / "c"), resume=str(ckpt), **{**common, "lr": 1e-3}))


def test_lora_run_checkpoints_only_adapters_and_exports_merged(fixture_model_dir, shapes_data, tmp_path):
    cfg = TrainConfig(data=str(shapes_data), eval_data=str(shapes_data), eval_max_examples=4, out=str(tmp_path / "r"),
                      model=str(fixture_model_dir), preset="lora", lora_rank=4, lora_dropout=0.0, steps=2,
                      batch_size=2, lr=1e-2, save_every=2, dtype="fp32", export_hf=str(tmp_path / "hub"))
    trainer = Trainer(cfg)
    result = trainer.run()
    ckpt = tmp_path / "r" / "checkpoints" / "step-00000002"
    with safe_open(str(ckpt / "trainable-00000.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2 and "python_random" in state["rng"]
    with safe_open(str(ckpt / "optimizer-00000.safetensors"), "pt") as f:
        assert {k.rpartition("/")[0] for k in f.keys()} == keys
    assert 0.0 <= result["eval"]["exact_match"] <= 1.0 and result["eval"]["eval_loss"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2] and "eval_loss" in metrics[-1]

    final = result["final"]
    assert not any(isinstance(m, LoRALinear) for m in trainer.model.modules())
    assert sorted(os.listdir(final)) == ["cogvlm_config.json", "model-00001-of-00001.safetensors",
                                         "model.safetensors.index.json", "tokenizer.model"]
    loaded = CogVLM.from_pretrained(final, device="cpu", dtype=torch.float32)
    batch = trainer.train_data.batch([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(training_loss(loaded, batch)[0], training_loss(trainer.model, batch)[0])
    base = CogVLM.from_pretrained(fixture_model_dir, device="cpu", dtype=torch.float32)
    w = "llm.layers.0.attn.vision_expert_qkv.weight"
    assert not torch.equal(dict(loaded.named_parameters())[w], dict(base.named_parameters())[w])  # merged
    assert (tmp_path / "hub" / "config.json").exists()


def test_from_scratch_init_is_seeded(tiny_init):
    a, b, c = build_model(tiny_init, seed=1), build_model(tiny_init, seed=1), build_model(tiny_init, seed=2)
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["llm.embed.weight"], pc["llm.embed.weight"])
    assert torch.equal(pa["llm.norm.weight"], torch.ones_like(pa["llm.norm.weight"]))
    assert torch.equal(pa["vision.layers.0.attn.qkv.bias"], torch.zeros_like(pa["vision.layers.0.attn.qkv.bias"]))
    assert abs(pa["llm.lm_head.weight"].std().item() - 32**-0.5) < 2e-3  # 1/sqrt(fan_in) by default
    assert abs(pa["vision.patch_embed.proj.weight"].std().item() - (3 * 14 * 14) ** -0.5) < 2e-3
    fixed = init_weights(CogVLM(tiny_config()), seed=1, std=0.02)
    assert abs(dict(fixed.named_parameters())["llm.lm_head.weight"].std().item() - 0.02) < 1e-3


def test_cli_options_and_resume_defaults(tmp_path, tiny_init, shapes_data):
    parser = argparse.ArgumentParser()
    add_finetune_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--init", str(tiny_init), "--data", str(shapes_data), "--out",
                              str(tmp_path / "x"), "--preset", "full", "--lr", "3e-3", "--steps", "2",
                              "--batch-size", "2", "--save-every", "2", "--lora-targets", "a", "b",
                              "--gradient-checkpointing", "--dtype", "fp32", "--no-export"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.steps, cfg.lora_targets, cfg.gradient_checkpointing, cfg.export) == (
        3e-3, 2, ["a", "b"], True, False)
    assert cfg.warmup_steps is None and cfg.grad_accum == 1  # dataclass defaults for options not given
    scratch = config_from_args(parser.parse_args(["finetune", "--init", "c.json", "--data", "d", "--out", "o"]))
    assert scratch.preset == "full"  # from scratch everything trains unless --preset says otherwise
    args.func(args)
    resume = parser.parse_args(["finetune", "--resume", str(tmp_path / "x"), "--no-export"])
    rcfg = config_from_args(resume)  # everything else from the checkpoint
    assert (rcfg.lr, rcfg.steps, rcfg.init, rcfg.out) == (3e-3, 2, str(tiny_init), str(tmp_path / "x"))


# ================================================================================================= data
def test_loader_builds_what_prompt_build_inputs_builds(tok, tmp_path, shapes_data):
    image = shapes_data.parent / "images" / "000000.png"
    lines = [
        {"image": str(image), "conversations": [
            {"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a circle"},
            {"role": "user", "content": "Which colour?"}, {"role": "assistant", "content": "red"}]},
        {"image": None, "conversations": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello"}]},
        {"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "meta": 1},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    for template in ("chat", "vqa", "base"):
        ds = ConversationDataset(path, tok, 56, 14, template=template)
        assert len(ds) == 3
        n_img = image_token_count(56, 14)
        ref = [build_inputs(tok, "Which colour?", [("What is it?", "a circle")], template, n_img, answer="red"),
               build_inputs(tok, "Hi", [], template, None, answer="Hello"),
               build_inputs(tok, "x", [], template, None, answer="y")]
        for i, r in enumerate(ref):
            for k in ("input_ids", "token_type_ids", "labels", "attention_mask"):
                assert torch.equal(ds[i][k], r[k]), (template, i, k)
        assert torch.equal(ds[0]["pixel_values"], preprocess(image, 56)) and ds[1]["pixel_values"] is None
        batch = ds.batch([1, 0, 2])
        assert batch["input_ids"].shape == (3, len(ref[0]["input_ids"]))
        assert batch["pixel_values"].shape == (1, 3, 56, 56)
        assert torch.equal(batch["labels"][1], ref[0]["labels"])  # right padding: the longest row is unchanged
        assert (batch["labels"][0, len(ref[1]["labels"]):] == -100).all()
    every = ConversationDataset(path, tok, 56, 14, all_turns=True)
    assert len(every) == 4
    assert torch.equal(every[0]["labels"], build_inputs(tok, "What is it?", [], "chat", image_token_count(56, 14),
                                                        answer="a circle")["labels"])


def write(tmp_path, *lines) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def test_bad_data_gives_clear_errors(tmp_path, tok):
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_jsonl(write(tmp_path, GOOD, '{"image": null, "conversations": [}'))
    with pytest.raises(DataError, match=r"bad\.jsonl:1: image file not found: .*nope\.png"):
        read_jsonl(write(tmp_path, json.dumps({"image": "nope.png", **json.loads(GOOD)})))
    ends_with_user = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                        {"role": "user", "content": "and?"}]}
    with pytest.raises(DataError, match=r"bad\.jsonl:3: the conversation must end with an assistant turn"):
        read_jsonl(write(tmp_path, GOOD, "", json.dumps(ends_with_user)))
    with pytest.raises(DataError, match=r":1: turn 1 is 'assistant' but should be 'user'"):
        read_jsonl(write(tmp_path, json.dumps({"conversations": [{"role": "assistant", "content": "a"}]})))
    with pytest.raises(DataError, match=r":1: turn 2 has role 'bot'"):
        read_jsonl(write(tmp_path, json.dumps({"conversations": [{"role": "user", "content": "q"},
                                                                 {"role": "bot", "content": "a"}]})))
    with pytest.raises(DataError, match=r":1: turn 2 \(assistant\) has empty"):
        read_jsonl(write(tmp_path, json.dumps({"conversations": [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": " "}]})))
    with pytest.raises(DataError, match="'conversations' must be a non-empty list"):
        read_jsonl(write(tmp_path, json.dumps({"image": None})))
    with pytest.raises(DataError, match="holds no records"):
        read_jsonl(write(tmp_path, ""))
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    # every bad line is reported at once
    with pytest.raises(DataError, match=r"3 bad record\(s\)(.|\n)*:1: (.|\n)*:2: (.|\n)*:4: "):
        read_jsonl(write(tmp_path, "[1]", "nope", GOOD, "{}"))
    long = json.dumps({"conversations": [{"role": "user", "content": "word " * 3000},
                                         {"role": "assistant", "content": "a"}]})
    with pytest.raises(DataError, match=r"bad\.jsonl:2: input is \d+ tokens .* over the limit of 2048"):
        ConversationDataset(write(tmp_path, GOOD, long), tok, 56, 14)
    # an image that exists but cannot be decoded fails when used, naming its line
    (tmp_path / "broken.png").write_bytes(b"not a png")
    ds = ConversationDataset(write(tmp_path, json.dumps({"image": "broken.png", **json.loads(GOOD)})), tok, 56, 14)
    with pytest.raises(DataError, match=r"bad\.jsonl:1: cannot read image .*broken\.png"):
        ds[0]


# ==================================================================================== the shipped model
def test_tiny_shapes_model_is_small_and_answers_fresh_images(tmp_path):
    files = [p for p in TINY_SHAPES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15_000_000
    assert (TINY_SHAPES / "tokenizer.model").exists() and (TINY_SHAPES / "README.md").exists()
    torch.manual_seed(0)
    model = CogVLM.from_pretrained(TINY_SHAPES, device="cpu", dtype=torch.float32)
    tok = Tokenizer(TINY_SHAPES / "tokenizer.model")
    rng = random.Random(20240601)  # images the model has never seen
    prompts, expected = [], []
    for _ in range(30):
        s = shapes.sample_shape(rng, rng.randint(64, 128), rng.randint(64, 128))
        px = preprocess(shapes.render(s), model.cfg.vision.image_size)
        prompts.append(("Describe the image.", [], px))
        expected.append(s.answer("describe"))
    got = generate_answers(model, tok, prompts, model.cfg.template_version, model.cfg.num_image_tokens, 8)
    accuracy = sum(g == e for g, e in zip(got, expected)) / len(expected)
    assert accuracy >= 0.9, list(zip(got, expected))


def test_coarser_trained_weights_than_the_compute_are_refused_before_anything_is_written(fixture_model_dir,
                                                                                         shapes_data, tmp_path):
    """bf16 master weights under fp32 compute cannot work (a bf16 parameter meets fp32 activations): one error that
    names both options and the two ways out, before the model is loaded or the run folder made."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--trainable-dtype bf16 with fp32 compute.*--dtype bf16"):
        Trainer(TrainConfig(data=str(shapes_data), out=str(out), model=str(fixture_model_dir), preset="full",
                            steps=1, dtype="fp32", trainable_dtype="bf16", export=False))
    assert not out.exists()
