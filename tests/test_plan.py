"""The memory planner (cogvlm/parallel/plan.py) on the full-size configs (no weights), its byte counts from the real
modules (a swapped-in module counted as it is stored), and `cogvlm plan`, which must decide as the model commands do."""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cogvlm import CogVLM
from cogvlm.cli import plan as plan_command
from cogvlm.cli.options import UsageError
from cogvlm.config import CogVLMConfig
from cogvlm.convert import convert
from cogvlm.parallel import device_map as dm
from cogvlm.parallel import plan as pl

from .test_device_map import FIXTURES, MANIFEST, fake_gpus, image_case

CHAT = CogVLMConfig.from_name("cogvlm-chat-hf")
GiB = 2**30
BUDGETS = ["0=20GiB,1=20GiB", "0=20GiB,1=20GiB,2=20GiB,3=20GiB", "0=16GiB,1=16GiB,cpu=60GiB", "0=80GiB",
           "0=24GiB,1=16GiB,2=12GiB", "cuda:1=22GiB,cuda:0=10GiB,cpu=8GiB"]


def cfg_key(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


@functools.lru_cache
def _meta_model(name):
    with torch.device("meta"):
        return CogVLM(CogVLMConfig.from_name(name))


def _cost(blocks, name, batch, context) -> int:
    """Bytes a run of blocks of preset `name` takes on one device, bf16: weights, KV cache, the largest transient."""
    cfg, model = CogVLMConfig.from_name(name), _meta_model(name)
    kv = 2 * batch * context * cfg.text.hidden_size * 2
    weights = {b: 2 * sum(p.numel() for p in model.get_submodule(b).parameters()) for b in blocks}
    return (sum(weights[b] + (kv if b.startswith("llm.layers.") else 0) for b in blocks)
            + max(pl.transient_bytes(b, cfg, batch, context, 2) for b in blocks))


@pytest.mark.parametrize("strategy", dm.STRATEGIES)
@pytest.mark.parametrize("budgets", BUDGETS)
@pytest.mark.parametrize("name, batch, context", [("cogvlm-chat-hf", 1, 2048), ("cogvlm-base-224-hf", 4, 1024)])
def test_plan_respects_budgets_and_block_order(name, batch, context, budgets, strategy, monkeypatch):
    fake_gpus(monkeypatch, 4)  # the plan is checked as a map for a machine that has these GPUs
    cfg = CogVLMConfig.from_name(name)
    p = pl.plan(cfg, budgets, batch_size=batch, context=context, strategy=strategy)
    assert list(p.device_map) == dm.block_names(cfg)  # every block placed, in forward order
    assert dm.block_devices(p, cfg)  # a plan is a valid map
    order = list(p.devices)  # GPUs by index, cpu last
    assert order == sorted(order, key=lambda d: (d == "cpu", int(d.split(":")[1]) if ":" in d else 0))
    ranks = [order.index(d) for d in p.device_map.values()]
    assert ranks == sorted(ranks)  # contiguous runs: activations cross each device boundary once
    for d, use in p.devices.items():
        assert use.total <= use.budget, d
    n_params = sum(x.numel() for x in _meta_model(name).parameters())
    assert sum(u.weights for u in p.devices.values()) == 2 * n_params  # bf16
    assert sum(u.kv_cache for u in p.devices.values()) == cfg.text.num_hidden_layers * 2 * batch * context * 4096 * 2
    gpus = [u for d, u in p.devices.items() if d != "cpu"]
    on_cpu = p.devices["cpu"].blocks if "cpu" in p.devices else []
    if strategy == "auto" and on_cpu:  # cpu only once the GPUs are full: none has room for the next block
        assert all(u.budget - u.total < _cost(on_cpu[:1], name, batch, context) for u in gpus)
    if strategy == "balanced":  # balancing never sends more to cpu than "auto" does
        auto = pl.plan(cfg, budgets, batch_size=batch, context=context)
        assert on_cpu == (auto.devices["cpu"].blocks if "cpu" in auto.devices else [])
    if strategy == "balanced" and len({u.budget for u in gpus}) == 1 and "cpu" not in p.devices:
        units = [[b] for b in p.device_map] + [["llm.embed", "llm.layers.0"]]  # these two are placed together
        largest = max(_cost(u, name, batch, context) for u in units)
        loads = [u.total for u in gpus]
        assert max(loads) - min(loads) <= largest, loads


def test_auto_fills_in_order_and_balanced_spreads():
    auto = pl.plan(CHAT, "0=20GiB,1=20GiB,2=20GiB,3=20GiB")
    balanced = pl.plan(CHAT, "0=20GiB,1=20GiB,2=20GiB,3=20GiB", strategy="balanced")
    assert [bool(u.blocks) for u in auto.devices.values()] == [True, True, False, False]
    assert all(u.blocks for u in balanced.devices.values())
    assert max(u.total for u in balanced.devices.values()) < 0.3 * sum(u.total for u in auto.devices.values())


def test_refusal_gives_the_numbers_and_what_to_change():
    with pytest.raises(pl.DoesNotFitError) as e:
        pl.plan(CHAT, "0=16GiB,1=16GiB")
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and e.value.available == 32 * GiB and e.value.needed > 33.9 * GiB
    for part in ("needs 34.1 GiB (weights 32.9 + KV cache 1.0 + activations 0.3)", "budgets total 32.0 GiB",
                 "--max-memory", "cpu=", "--batch-size/--context", "smaller dtype"):
        assert part in msg, msg
    # Enough memory in total (50 GiB), but no device holds a decoder layer with its activations.
    with pytest.raises(pl.DoesNotFitError, match=r"from llm.embed on, 25.6 GiB found no room \(llm.embed \+ "
                       r"llm.layers.0 alone needs 1.2\d GiB with its activations, more than any one budget\)") as e:
        pl.plan(CHAT, ",".join(f"{i}=0.5GiB" for i in range(100)))
    assert e.value.needed < e.value.available


def test_lm_head_reserves_last_position_logits_unless_full_logits():
    """Generation computes the logits of the last position only; a scoring forward, of every position."""
    batch, context, v = 8, 2048, CHAT.text.vocab_size
    assert pl.transient_bytes("llm.lm_head", CHAT, batch, context, 2) == batch * v * (2 + 4)
    assert pl.transient_bytes("llm.lm_head", CHAT, batch, context, 2, full_logits=True) == batch * context * v * 6
    last, full = (pl.plan(CHAT, "cpu=80GiB", batch, full_logits=f) for f in (False, True))
    assert full.devices["cpu"].activations == batch * context * v * 6 > last.devices["cpu"].activations
    assert full.full_logits and "logits of every position" in full.format_table()


class Int8Linear(nn.Module):
    """Stands in for a weight-only quantized linear: int8 weights and a scale per output row, as buffers."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", torch.empty(linear.weight.shape, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(linear.out_features))


def swap_lm_head(model):
    model.llm.lm_head = Int8Linear(model.llm.lm_head)


def test_block_bytes_come_from_the_modules_after_prepare():
    """Counted as the loader will store them: floats in the load dtype, integers as they are; buffers too."""
    plain = pl.block_sizes(cfg_key(CHAT), torch.bfloat16)
    swapped = pl.block_sizes(cfg_key(CHAT), torch.bfloat16, swap_lm_head)
    v, d = CHAT.text.vocab_size, CHAT.text.hidden_size
    assert plain.weights["llm.lm_head"] == v * d * 2
    assert swapped.weights["llm.lm_head"] == v * d * 1 + v * 2  # int8 weights, bf16 scales
    assert {k: w for k, w in swapped.weights.items() if k != "llm.lm_head"} == \
        {k: w for k, w in plain.weights.items() if k != "llm.lm_head"}
    assert pl.block_sizes(cfg_key(CHAT), torch.float32).weights["llm.lm_head"] == v * d * 4
    assert plain.kv_per_token["llm.layers.3"] == 2 * d * 2 and plain.kv_per_token["llm.norm"] == 0
    need = pl.plan(CHAT, "0=80GiB", context=64, prepare=swap_lm_head).devices["cuda:0"]
    assert need.weights == sum(swapped.weights.values())
    assert pl.plan(CHAT, {"cuda:0": need.total}, context=64, prepare=swap_lm_head)  # fits once swapped...
    with pytest.raises(pl.DoesNotFitError):
        pl.plan(CHAT, {"cuda:0": need.total}, context=64)  # ...and not in bf16


# -- `cogvlm plan` ---------------------------------------------------------------------------------------------
def plan_args(*argv):
    parser = argparse.ArgumentParser()
    plan_command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


def test_plan_json_table_and_command(capsys):
    p = pl.plan(CHAT, "0=20GiB,1=20GiB", strategy="balanced")
    d = json.loads(p.to_json())
    assert d["device_map"] == p.device_map and d["devices"]["cuda:1"]["blocks"][-1] == "llm.lm_head"
    assert "cuda:0" in p.format_table() and "vision.layers.0-62" in p.format_table()
    args = plan_args("--model", "cogvlm-chat-hf", "--max-memory", "0=20GiB,1=20GiB", "--json", "--strategy",
                     "balanced", "--dtype", "bf16")
    assert plan_command.run(args) == 0
    assert json.loads(capsys.readouterr().out)["device_map"] == p.device_map
    args = plan_args("--model", "cogvlm-chat-hf", "--max-memory", "0=16GiB", "--context", "4096")
    assert plan_command.run(args) == 2 and "needs" in capsys.readouterr().err


def test_plan_defaults_to_the_dtype_the_model_commands_load_in(capsys, monkeypatch):
    assert plan_command.run(plan_args("--model", "cogvlm-chat-hf", "--max-memory", "cpu=80GiB", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "fp32"  # no GPU: ask/chat/caption load fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert plan_command.run(plan_args("--model", "cogvlm-chat-hf", "--max-memory", "0=80GiB", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bf16"


@pytest.mark.parametrize("model, error, message", [
    ("cogvlm-chat", UsageError,
     r"--model 'cogvlm-chat' is not a preset \(cogvlm-chat-hf, .*\), a config file or a checkpoint"),
    ("THUDM/cogvlm-nope-hf", UsageError, "--model 'THUDM/cogvlm-nope-hf' is not a preset"),
    ("{empty}", ValueError, r"--model {empty}: cannot read a CogVLM config there \(.* holds neither cogvlm_config"),
    ("{bad}", ValueError, r"--model {bad}: cannot read a CogVLM config there \(Expecting value"),
])
def test_plan_model_errors_name_the_option(model, error, message, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("not json")
    paths = {"empty": tmp_path / "empty", "bad": tmp_path / "bad.json"}
    model, message = model.format(**paths), message.format(**{k: str(v) for k, v in paths.items()})
    with pytest.raises(error, match=message):
        plan_command.run(plan_args("--model", model, "--max-memory", "0=20GiB"))


def test_plan_command_module_does_not_import_torch():
    code = ("import sys, argparse; from cogvlm.cli import plan; p = argparse.ArgumentParser(); "
            "plan.add_parser(p.add_subparsers()); p.parse_args(['plan', '--model', 'x', '--max-memory', '0=1GiB']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# -- plan and the model commands agree -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return convert(FIXTURES / MANIFEST.get("model_dir", "model"), tmp_path_factory.mktemp("plan") / "ours")


def test_plan_and_loading_agree_at_the_edge_of_the_budget(tiny, capsys):
    """`cogvlm plan --batch-size 8` fits exactly when loading for caption's batch of 8 does (same dtype, context,
    logits), one byte either side of the plan's own total."""
    assert plan_command.run(plan_args("--model", str(tiny), "--max-memory", "cpu=1GiB", "--batch-size", "8",
                                      "--json")) == 0
    total = json.loads(capsys.readouterr().out)["devices"]["cpu"]["total"]
    for budget, fits in ((total, True), (total - 1, False)):
        status = plan_command.run(plan_args("--model", str(tiny), "--max-memory", f"cpu={budget}", "--batch-size",
                                            "8"))
        assert status == (0 if fits else 2), budget
        load = functools.partial(CogVLM.from_pretrained, tiny, device="cpu", device_map="auto",
                                 max_memory=f"cpu={budget}", plan_options={"batch_size": 8})  # what caption passes
        if fits:
            model = load()
            case = {k: t.expand(8, *t.shape[1:]).contiguous() for k, t in image_case().items()
                    if k in ("input_ids", "token_type_ids", "pixel_values")}
            assert len(model.generate(**case, max_new_tokens=1)) == 8  # and runs at that batch
        else:
            with pytest.raises(pl.DoesNotFitError):
                load()


def test_the_issue_case_fits_for_plan_and_for_caption(tiny, monkeypatch, capsys):
    """--max-memory 0=1GiB,cpu=2GiB at batch 8 on the fixture model in fp32: plan said it fits (it planned bf16 and
    batch 1), caption refused ("lm_head needs 3.92 GiB": fp32 logits of all 2048 positions of 8 rows, where generation
    computes the last position's only). Given the same inputs, both plan the same map now."""
    fake_gpus(monkeypatch, 1)
    assert plan_command.run(plan_args("--model", str(tiny), "--max-memory", "0=1GiB,cpu=2GiB", "--batch-size", "8",
                                      "--dtype", "fp32", "--json")) == 0
    planned = json.loads(capsys.readouterr().out)["device_map"]
    cfg = CogVLMConfig.load(tiny)
    loading = pl.resolve_device_map("auto", cfg, "0=1GiB,cpu=2GiB", dtype=torch.float32, batch_size=8)
    assert {b: str(d) for b, d in loading.items()} == planned
