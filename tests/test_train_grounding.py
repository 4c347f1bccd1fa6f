"""examples/train_grounding.py, the one-command GPU run of examples/tiny-ground: its start model, the model it makes
from a checkpoint when the training dies, the shards it returns, and how many data workers it dares."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from cogvlm import CogVLM, shapes
from cogvlm.config import CogVLMConfig, TextConfig, VisionConfig
from cogvlm.finetune import TrainConfig, train
from cogvlm.shards import list_shards, read_tensors, write_tensors

ROOT = Path(__file__).parent.parent
TOKENIZER_MODEL = Path(__file__).parent / "fixtures" / "tokenizer" / "tokenizer.model"
spec = importlib.util.spec_from_file_location("train_grounding", ROOT / "examples" / "train_grounding.py")
tg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tg)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    cfg = CogVLMConfig(  # a 4 x 4 patch grid
        text=TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_hidden_layers=2, image_size=32,
                            patch_size=8, num_positions=17),
    )
    path = tmp_path_factory.mktemp("tg") / "cogvlm_config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def test_sincos_code_makes_row_and_column_linearly_readable():
    grid, dim = 14, 192
    code = tg.sincos_2d(grid, dim).double()
    assert code.shape == (grid * grid, dim)
    torch.testing.assert_close(code.mean(0), torch.zeros(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(code.std(0), torch.ones(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    rows, cols = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
    place = torch.stack([rows, cols], 1).double()
    x = torch.cat([code, torch.ones(grid * grid, 1, dtype=torch.float64)], 1)
    fit = x @ torch.linalg.lstsq(x, place, driver="gelsd").solution  # a linear probe reads row and column
    assert (fit - place).abs().max() < 0.5


def test_start_checkpoint_fallback_and_shards_give_the_trained_model(config, tmp_path):
    start = tg.make_start(config, TOKENIZER_MODEL, tmp_path / "start", seed=3)
    model = CogVLM.from_pretrained(start, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(model.vision.patch_embed.pos_embed[1:], tg.sincos_2d(4, 32), atol=0, rtol=0)

    data = shapes.generate(tmp_path / "shapes", n=4, seed=0, min_side=40, max_side=60, mix={"ground": 1})
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(run), model=str(start), preset="full", steps=2, batch_size=2, lr=1e-2,
                      dtype="fp32", save_every=2, export_dtype="fp16", log_every=100))
    exported = params(CogVLM.from_pretrained(run / "final", device="cpu", dtype=torch.float16))
    # the training died after its checkpoint: the checkpoint over the start is the same model as the export
    rebuilt = tg.model_from_checkpoint(run / "checkpoints" / "step-00000002", start, tmp_path / "rebuilt")
    got = params(CogVLM.from_pretrained(rebuilt, device="cpu", dtype=torch.float16))
    assert got.keys() == exported.keys() and all(torch.equal(got[n], exported[n]) for n in got)
    assert not torch.equal(got["llm.lm_head.weight"], params(model)["llm.lm_head.weight"].half())  # it trained

    small = tg.reshard(run / "final", tmp_path / "ship", max_bytes=2**20)  # 1 MiB shards: lm_head alone is 2 MB
    assert len(list_shards(small)) >= 3
    again = params(CogVLM.from_pretrained(small, device="cpu", dtype=torch.float16))
    assert all(torch.equal(again[n], exported[n]) for n in exported)

    partial = tmp_path / "partial"  # a checkpoint of some tensors only (another preset)
    shutil.copytree(run / "checkpoints" / "step-00000002", partial)
    kept = list(read_tensors(partial, "trainable").items())[:3]
    for f in partial.glob("trainable-*"):
        f.unlink()
    write_tensors(partial, "trainable", kept)
    with pytest.raises(ValueError, match="not a --preset full checkpoint"):
        tg.model_from_checkpoint(partial, start, tmp_path / "bad")


def test_data_workers_are_limited_by_shared_memory(tmp_path):
    assert tg.affordable_workers(12, 512, 112, shm=str(tmp_path / "missing")) == 0
    assert tg.affordable_workers(3, 1, 8, shm=str(tmp_path)) == 3  # tiny batches: as many as asked
    free = shutil.disk_usage(tmp_path).free
    huge = free // (3 * 112 * 112 * 4) + 1  # one batch of this many images would not fit
    assert tg.affordable_workers(12, huge, 112, shm=str(tmp_path)) == 0


# ==================================================================================== the shipped model
TINY_GROUND = ROOT / "examples" / "tiny-ground"


def test_tiny_ground_architecture_fits_what_ships_and_what_travels():
    model = tg.build_model(TINY_GROUND / "cogvlm_config.json")
    n = sum(p.numel() for p in model.parameters())
    assert n * 2 < 21_000_000  # fp16: the folder stays well under 30 MB, the repository under 64 MiB
    assert model.cfg.vision.image_size // model.cfg.vision.patch_size == 14  # a 14 x 14 patch grid
    assert max(p.numel() * 2 for p in model.parameters()) < tg.SHARD_BYTES  # every tensor fits a returned shard
    tokenizer = (TINY_GROUND / "tokenizer.model").read_bytes()
    assert tokenizer == (ROOT / "examples" / "tiny-shapes" / "tokenizer.model").read_bytes()


def test_tiny_ground_model_grounds_and_captions_fresh_scenes():
    """The shipped weights ground and caption scenes that neither the training (seeds 1000-1015, validation 2) nor
    the issue's evaluation (1234, 4321) drew. Bounds sit well below what the model scores (docs/grounding.md) and far
    above a model that does not ground (examples/tiny-shapes: 0 % of boxes)."""
    assert (TINY_GROUND / "model.safetensors.index.json").exists(), "examples/tiny-ground has lost its weights"
    files = [p for p in TINY_GROUND.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30_000_000
    model = CogVLM.from_pretrained(TINY_GROUND, device="cpu", dtype=torch.float32)
    result = shapes.evaluate(model, images=60, scenes=40, seed=20240601, scene_seed=97, attention=False)
    assert result["ground_questions"] > 40, result  # 1-3 shapes a scene, each asked about
    assert result["ground_iou50"] >= 0.8 and result["ground_mean_iou"] >= 0.7, result
    assert result["boxes_all_right"] >= 0.5, result  # describe-with-boxes: every shape named and boxed
    assert result["caption_exact"] >= 0.9, result
