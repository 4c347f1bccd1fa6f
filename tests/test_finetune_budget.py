"""cogvlm.finetune for GPU runs: data worker processes (`--workers`) give the same batches as the training process,
and a wall-clock budget (`--max-minutes`) fits the step count so that the schedule ends with the time."""
from __future__ import annotations

import argparse
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cogvlm import shapes
from cogvlm.cli.finetune import add_parser as add_finetune_command, config_from_args
from cogvlm.config import CogVLMConfig, TextConfig, VisionConfig
from cogvlm.finetune import TrainConfig, Trainer, train
from cogvlm.finetune import trainer as trainer_module
from cogvlm.finetune.budget import SKIP, WINDOW, TimeBudget
from cogvlm.finetune.loader import BatchOrder, batch_stream

TOKENIZER_MODEL = Path(__file__).parent / "fixtures" / "tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return shapes.generate(tmp_path_factory.mktemp("budget") / "shapes", n=8, seed=0, min_side=40, max_side=60)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("budget") / "tiny"
    folder.mkdir()
    cfg = CogVLMConfig(
        text=TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_hidden_layers=2, image_size=28,
                            num_positions=5),
    )
    (folder / "cogvlm_config.json").write_text(json.dumps(cfg.to_dict()))
    shutil.copyfile(TOKENIZER_MODEL, folder / "tokenizer.model")
    return folder / "cogvlm_config.json"


def common(shapes_data, tiny_init, **kw):
    return dict(data=str(shapes_data), init=str(tiny_init), preset="full", batch_size=3, lr=3e-3, warmup_steps=2,
                seed=5, dtype="fp32", log_every=100, export=False, **kw)


def trained(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "trainable-00000.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ================================================================================================ workers
def test_worker_stream_yields_the_trainers_micro_batches(tiny_init, shapes_data, tmp_path):
    trainer = Trainer(TrainConfig(out=str(tmp_path / "r"), steps=4, grad_accum=2, **common(shapes_data, tiny_init)))
    order = BatchOrder(len(trainer.train_data), 3, 2, 5)
    assert order.indices(1, 1) == trainer.batch_indices(1, 1)
    epoch = [i for k in range(8) for i in order.indices(*divmod(k, 2))]  # 24 examples (8 images x 3), 3 a batch
    assert sorted(epoch) == list(range(24)) and order.indices(4, 0) != epoch[:3]  # the next epoch: another order
    stream = batch_stream(trainer.train_data, order, first=3, workers=2)
    for k in range(3, 9):  # micro-batch k of step k // 2, in order, across epochs
        got, want = next(stream), trainer.train_data.batch(order.indices(*divmod(k, 2)))
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    stream.close()


def test_runs_with_workers_train_bit_for_bit_like_runs_without(tiny_init, shapes_data, tmp_path):
    kw = common(shapes_data, tiny_init, steps=6, grad_accum=2, save_every=3, keep_checkpoints=3)
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **kw))
    with_workers = train(TrainConfig(out=str(tmp_path / "workers"), workers=2, **kw))
    assert [r["loss"] for r in with_workers["history"]] == [r["loss"] for r in plain["history"]]
    last = "checkpoints/step-00000006"
    a, b = trained(tmp_path / "plain" / last), trained(tmp_path / "workers" / last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resumed with another worker count: the same batches again
    resumed = train(TrainConfig(out=str(tmp_path / "resumed"), resume=str(tmp_path / "workers/checkpoints/"
                                                                           "step-00000003"), workers=1, **kw))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in plain["history"][3:]]
    with pytest.raises(ValueError, match="--workers must be >= 0"):
        Trainer(TrainConfig(out=str(tmp_path / "bad"), workers=-1, **kw))


# ================================================================================================= budget
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_fits_the_steps_to_the_time_left():
    clock = FakeClock()
    b = TimeBudget(1.0, clock=clock)  # 60 s
    clock.now += 10  # data loading, model building: counted
    step, total = 0, 10**9
    while True:
        clock.now += 2.0  # 2 s a step
        step += 1
        total = b.fit(step, total)
        if step == 1 + SKIP + WINDOW:  # timed from the step SKIP after the first, fitted WINDOW steps later
            assert b.rate == 2.0 and total == step + int((60 - 10 - 2 * step) / 2.0)
        elif step < 1 + SKIP + WINDOW:
            assert total == 10**9 and b.rate is None
        if step >= total:
            break
    assert step == total == 25 and b.left() <= 0  # (60 - 10) / 2 steps, the last one ending with the budget

    capped, fits = TimeBudget(1.0, cap=12, clock=clock), []
    for step in range(1, 13):
        clock.now += 1.0
        fits.append(capped.fit(step, 12))
    assert fits == [12] * 12  # 60 steps would fit: never more than the cap
    with pytest.raises(ValueError, match="must be > 0"):
        TimeBudget(0)


def test_budgeted_run_ends_its_schedule_when_the_time_ends(tiny_init, shapes_data, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(trainer_module, "TimeBudget", functools.partial(TimeBudget, clock=clock))
    original = Trainer.train_step

    def one_second_step(self):
        clock.now += 1.0
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", one_second_step)
    kw = common(shapes_data, tiny_init, min_lr_ratio=0.0, save_every=1000, keep_checkpoints=1)
    result = train(TrainConfig(out=str(tmp_path / "b"), max_minutes=0.5, export=True, eval_data=str(shapes_data),
                               eval_max_examples=2, **{k: v for k, v in kw.items() if k != "export"}))
    steps = [r["step"] for r in result["history"]]
    assert steps == list(range(1, 31))  # 30 s at 1 s a step
    lrs = [r["lr"] for r in result["history"]]
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] < 0.01 * 3e-3  # the cosine ran its course in the time
    state = json.loads((tmp_path / "b/checkpoints/step-00000030/state.json").read_text())
    assert state["total_steps"] == 30 and state["scheduler"]["lr_lambdas"][0]["total"] == 30
    assert result["final"] is not None and (Path(result["final"]) / "cogvlm_config.json").exists()
    assert "eval_loss" in result["eval"]

    clock.now = 100.0
    capped = train(TrainConfig(out=str(tmp_path / "c"), max_minutes=0.5, steps=12, **kw))
    assert len(capped["history"]) == 12  # --steps is the most a budget gives
    with pytest.raises(ValueError, match="needs --warmup-steps"):
        Trainer(TrainConfig(out=str(tmp_path / "d"), max_minutes=1, **{**kw, "warmup_steps": None}))


def test_cli_workers_and_budget_options(tiny_init, shapes_data, tmp_path):
    parser = argparse.ArgumentParser()
    add_finetune_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--init", str(tiny_init), "--data", str(shapes_data), "--out",
                              str(tmp_path / "x"), "--workers", "3", "--max-minutes", "4.5", "--warmup-steps", "9"])
    cfg = config_from_args(args)
    assert (cfg.workers, cfg.max_minutes, cfg.warmup_steps, cfg.steps) == (3, 4.5, 9, None)
    defaults = config_from_args(parser.parse_args(["finetune", "--init", "c.json", "--data", "d", "--out", "o"]))
    assert (defaults.workers, defaults.max_minutes) == (0, None)
