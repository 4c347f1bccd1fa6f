"""Device maps (issue 5): parsing and validating hand-written maps, the planner on the full-size configs (no
weights), and a mapped forward + cached decode that must equal the unmapped model exactly."""
from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogvlm import device_map as dm
from cogvlm.config import CogVLMConfig
from cogvlm.convert import convert
from cogvlm.generate import DecodeSession
from cogvlm import CogVLM
from cogvlm.visual_expert import ExpertRoute

FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CHAT = CogVLMConfig.from_name("cogvlm-chat-hf")
GiB = 2**30


# -- hand-written maps ---------------------------------------------------------------------------------------------
def test_parse_max_memory_units_and_devices():
    mm = dm.parse_max_memory("0=20GiB, 1=20GB,cuda:2=512MiB,3=512MB,cpu=1.5GiB")
    assert mm == {"cuda:0": 20 * GiB, "cuda:1": 20 * 10**9, "cuda:2": 512 * 2**20, "cuda:3": 512 * 10**6,
                  "cpu": int(1.5 * GiB)}
    for bad in ("0:20GiB", "0=20XB", "0=", "disk=1GiB", ""):
        with pytest.raises(dm.DeviceMapError):
            dm.parse_max_memory(bad)


def test_manual_map_prefixes_ranges_and_short_spellings():
    long = {"vision": "cuda:0", "adapter": 0, "llm.embed": "cuda", "llm.layers.0-15": "cuda:0",
            "llm.layers.16-31": "cuda:1", "llm.norm": "cuda:1", "llm.lm_head": 1}
    short = {"vision": 0, "adapter": 0, "embed": 0, "layers.0-15": 0, "layers.16-31": 1, "norm": 1, "lm_head": 1}
    blocks = dm.block_devices(long, CHAT)
    assert list(blocks) == dm.block_names(CHAT) and dm.block_devices(short, CHAT) == blocks
    assert blocks["vision.layers.62"] == blocks["llm.layers.15"] == torch.device("cuda:0")
    assert blocks["llm.layers.16"] == blocks["llm.lm_head"] == torch.device("cuda:1")
    # A narrower key overrides the wider one that holds it, whatever the order.
    assert dm.block_devices({"lm_head": 1, "layers.16-31": 1, "llm.norm": 1, "vision": 0, "adapter": 0, "llm": 0},
                            CHAT) == blocks
    spec = "vision=0, adapter=0,embed=0,layers.0-15=cuda:0,layers.16-31=1,norm=1,lm_head=1"
    assert dm.block_devices(dm.parse_device_map(spec), CHAT) == blocks
    assert dm.block_devices(dm.parse_device_map(json.dumps(short)), CHAT) == blocks
    assert dm.parse_device_map("balanced") == "balanced"
    with pytest.raises(dm.DeviceMapError, match="BLOCK=DEVICE"):
        dm.parse_device_map("vision:0")
    # device_for_param: every parameter goes to its block's device.
    with torch.device("meta"):
        model = CogVLM(CHAT)
    for name, _ in model.named_parameters():
        block = next(b for b in blocks if name.startswith(b + "."))
        assert dm.device_for_param(blocks, name) == blocks[block], name


@pytest.mark.parametrize("bad, message", [
    ({"vision": 0, "llm": 0, "llm.head": 1}, "unknown block 'llm.head'"),
    ({"vision": 0, "adapter": 0, "llm.embed": 0, "llm.layers.0-15": 0, "llm.norm": 1},
     r"unassigned: llm\.layers\.16-31, llm\.lm_head"),
    ({"vision": 0, "adapter": 0, "llm.layers.0-40": 0}, r"outside llm\.layers\.0-31"),
    ({"vision": 0, "adapter": 0, "llm": 0, "layers.0-20": 0, "layers.10-31": 1}, "on both cuda:0 and cuda:1"),
    ({"vision": 0, "adapter": 0, "llm": 1, "llm.embed": 0}, "must share a device"),
    ({"vision": "gpu0", "adapter": 0, "llm": 0}, "not a device"),
])
def test_manual_map_errors_are_clear(bad, message):
    with pytest.raises(dm.DeviceMapError, match=message):
        dm.block_devices(bad, CHAT)


# -- the planner, full-size configs, no weights --------------------------------------------------------------------
BUDGETS = ["0=20GiB,1=20GiB", "0=20GiB,1=20GiB,2=20GiB,3=20GiB", "0=16GiB,1=16GiB,cpu=60GiB", "0=80GiB",
           "0=24GiB,1=16GiB,2=12GiB", "cuda:1=22GiB,cuda:0=10GiB,cpu=8GiB"]


@pytest.mark.parametrize("strategy", dm.STRATEGIES)
@pytest.mark.parametrize("budgets", BUDGETS)
@pytest.mark.parametrize("name, batch, context", [("cogvlm-chat-hf", 1, 2048), ("cogvlm-base-224-hf", 4, 1024)])
def test_plan_respects_budgets_and_block_order(name, batch, context, budgets, strategy):
    cfg = CogVLMConfig.from_name(name)
    p = dm.plan(cfg, budgets, batch_size=batch, context=context, strategy=strategy)
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
        assert all(u.budget - u.total < _cost(on_cpu[:1], cfg, batch, context) for u in gpus)
    if strategy == "balanced":  # balancing never sends more to cpu than "auto" does
        auto = dm.plan(cfg, budgets, batch_size=batch, context=context)
        assert on_cpu == (auto.devices["cpu"].blocks if "cpu" in auto.devices else [])
    if strategy == "balanced" and len({u.budget for u in gpus}) == 1 and "cpu" not in p.devices:
        units = [[b] for b in p.device_map] + [["llm.embed", "llm.layers.0"]]  # these two are placed together
        largest = max(_cost(u, cfg, batch, context) for u in units)
        loads = [u.total for u in gpus]
        assert max(loads) - min(loads) <= largest, loads


def test_auto_fills_in_order_and_balanced_spreads():
    auto = dm.plan(CHAT, "0=20GiB,1=20GiB,2=20GiB,3=20GiB")
    balanced = dm.plan(CHAT, "0=20GiB,1=20GiB,2=20GiB,3=20GiB", strategy="balanced")
    assert [bool(u.blocks) for u in auto.devices.values()] == [True, True, False, False]
    assert all(u.blocks for u in balanced.devices.values())
    assert max(u.total for u in balanced.devices.values()) < 0.3 * sum(u.total for u in auto.devices.values())


def test_refusal_gives_the_numbers_and_what_to_change():
    with pytest.raises(dm.DoesNotFitError) as e:
        dm.plan(CHAT, "0=16GiB,1=16GiB")
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and e.value.available == 32 * GiB and e.value.needed > 34 * GiB
    for part in ("needs 34.2 GiB (weights 32.9 + KV cache 1.0 + activations 0.4)", "budgets total 32.0 GiB",
                 "--max-memory", "cpu=", "--batch-size/--context", "smaller dtype"):
        assert part in msg, msg
    # Enough memory in total (50 GiB), but no device holds a decoder layer with its activations.
    with pytest.raises(dm.DoesNotFitError, match=r"from llm.embed on, 25.6 GiB found no room \(llm.embed \+ "
                       r"llm.layers.0 alone needs 1.2\d GiB with its activations, more than any one budget\)") as e:
        dm.plan(CHAT, ",".join(f"{i}=0.5GiB" for i in range(100)))
    assert e.value.needed < e.value.available


def test_plan_json_table_and_cli(capsys):
    p = dm.plan(CHAT, "0=20GiB,1=20GiB", strategy="balanced")
    d = json.loads(p.to_json())
    assert d["device_map"] == p.device_map and d["devices"]["cuda:1"]["blocks"][-1] == "llm.lm_head"
    assert "cuda:0" in p.format_table() and "vision.layers.0-62" in p.format_table()

    parser = argparse.ArgumentParser()
    dm.add_plan_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--model", "cogvlm-chat-hf", "--max-memory", "0=20GiB,1=20GiB", "--json",
                              "--strategy", "balanced"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["device_map"] == p.device_map
    args = parser.parse_args(["plan", "--model", "cogvlm-chat-hf", "--max-memory", "0=16GiB", "--context", "4096"])
    with pytest.raises(SystemExit) as e:
        args.func(args)
    assert e.value.code == 2 and "needs" in capsys.readouterr().err


def _cost(blocks, cfg, batch, context) -> int:
    """Bytes a run of blocks takes on one device, bf16: weights, KV cache, the largest transient."""
    params = dm._block_params(json.dumps(cfg.to_dict(), sort_keys=True))
    kv = 2 * batch * context * cfg.text.hidden_size * 2
    return (sum(2 * params[b] + (kv if b.startswith("llm.layers.") else 0) for b in blocks)
            + max(dm.transient_bytes(b, cfg, batch, context, 2) for b in blocks))


@functools.lru_cache
def _meta_model(name):
    with torch.device("meta"):
        return CogVLM(CogVLMConfig.from_name(name))


# -- execution -----------------------------------------------------------------------------------------------------
def test_move_to_rebuilds_containers_and_routes_only_when_needed():
    t = torch.arange(3)
    nested = (t, [t, {"a": t, "flag": True}], ExpertRoute.from_token_types(torch.tensor([[0, 1, 1, 1, 0]])), None)
    assert dm.move_to(nested, torch.device("cpu")) is nested  # nothing to move: the same objects
    moved = dm.move_to(nested, torch.device("meta"))
    assert moved[0].is_meta and moved[1][0].is_meta and moved[1][1]["a"].is_meta and moved[1][1]["flag"] is True
    assert isinstance(moved[2], ExpertRoute) and all(t.is_meta for t in vars(moved[2]).values())
    assert nested[2].vision.device.type == "cpu"  # the original route is untouched


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return convert(FIXTURES / MANIFEST.get("model_dir", "model"), tmp_path_factory.mktemp("m") / "ours")


def image_case() -> dict:
    name = next(c for c, m in MANIFEST["cases"].items() if m.get("image") and not m.get("rows"))
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def run(model, case, device, steps=4, cuda_graph=None):
    """Full-sequence logits with trace, then a cached greedy decode: (logits, trace, decoded logits per step)."""
    ids, types, pixels = (case[k].to(device) for k in ("input_ids", "token_type_ids", "pixel_values"))
    trace = {}
    with torch.no_grad():
        logits = model(ids, types, pixel_values=pixels, trace=trace).logits
    session = DecodeSession(model, 1, ids.shape[1] + steps, cuda_graph=cuda_graph)
    decoded = [session.prefill(ids, types, pixel_values=pixels)]
    for _ in range(steps):
        decoded.append(session.step(decoded[-1].argmax(-1)).clone())  # a CUDA graph reuses its output buffer
    return logits, trace, torch.stack(decoded)


def split_map(cfg, first: str, second: str) -> dict:
    """Vision and the first half of the decoder on `first`, the rest on `second`; several parts either way."""
    half = cfg.text.num_hidden_layers // 2
    return {"vision.patch_embed": first, "vision.layers": second, "adapter": first, "llm.embed": first,
            f"layers.0-{half - 1}": first, f"layers.{half}-{cfg.text.num_hidden_layers - 1}": second,
            "norm": first, "lm_head": second}


def test_mapped_forward_and_decode_equal_the_unmapped_model(tiny):
    model = CogVLM.from_pretrained(tiny, device="cpu", dtype=torch.float32)
    case = image_case()
    ref_logits, ref_trace, ref_decoded = run(model, case, "cpu")
    hooks = dm.apply_device_map(model, split_map(model.cfg, "cpu", "cpu"))
    logits, trace, _ = run(model, case, "cpu", steps=0)
    assert {name: h.calls for name, h in hooks.items()} == dict.fromkeys(dm.block_names(model.cfg), 2)  # 2 passes
    assert torch.equal(logits, ref_logits)
    assert trace.keys() == ref_trace.keys()  # the trace dict is handed through the hooks, not copied
    _, _, decoded = run(model, case, "cpu")
    assert torch.equal(decoded, ref_decoded)
    assert hooks["llm.layers.0"].calls == 2 + 6  # then forward, prefill and 4 steps...
    dm.remove_device_map(model)
    model(case["input_ids"][:, :3])
    assert hooks["llm.layers.0"].calls == 8  # ...and nothing once removed


def test_from_pretrained_with_a_device_map(tiny):
    """The loader places each weight by the map and installs the hooks; outputs equal the unmapped model."""
    case = image_case()
    ref_logits, _, ref_decoded = run(CogVLM.from_pretrained(tiny, device="cpu", dtype=torch.float32), case, "cpu")
    model = CogVLM.from_pretrained(tiny, device="cpu", dtype=torch.float32,
                                   device_map=split_map(CogVLMConfig.load(tiny), "cpu", "cpu"))
    assert all(hasattr(model.get_submodule(b), "_forward_pre_hooks") and model.get_submodule(b)._forward_pre_hooks
               for b in dm.block_names(model.cfg))
    logits, _, decoded = run(model, case, "cpu")
    assert torch.equal(logits, ref_logits) and torch.equal(decoded, ref_decoded)
    with pytest.raises(dm.DeviceMapError):
        CogVLM.from_pretrained(tiny, device="cpu", device_map={"vision": "cpu"})  # the decoder is left unassigned


def test_from_pretrained_plans_for_the_requested_batch(tiny):
    """plan_options reach the planner: a budget that holds batch 1 refuses batch 64 before any weight is read."""
    budget = {"cpu": 100 * 2**20}
    model = CogVLM.from_pretrained(tiny, device="cpu", device_map="auto", max_memory=budget,
                                   plan_options={"batch_size": 1, "context": 64})
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(dm.DoesNotFitError, match="batch"):
        CogVLM.from_pretrained(tiny, device="cpu", device_map="auto", max_memory=budget,
                               plan_options={"batch_size": 64, "context": 64})


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_equal_one(tiny):
    case = image_case()
    one = CogVLM.from_pretrained(tiny, device="cuda:0", dtype=torch.float32)
    ref_logits, ref_trace, ref_decoded = run(one, case, "cuda:0")
    cpu_logits = run(CogVLM.from_pretrained(tiny, device="cpu", dtype=torch.float32), case, "cpu", 0)[0]
    torch.testing.assert_close(ref_logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)
    for device_map in (split_map(one.cfg, "cuda:0", "cuda:1"), split_map(one.cfg, "cuda:1", "cuda:0"),
                       dm.plan(one.cfg, {0: 2**30, 1: 2**30}, context=64, dtype=torch.float32, strategy="balanced")):
        model = CogVLM.from_pretrained(tiny, device="cpu", dtype=torch.float32)
        blocks = dm.block_devices(device_map, model.cfg)
        dm.apply_device_map(model, blocks)
        assert {p.device for p in model.parameters()} == {torch.device("cuda:0"), torch.device("cuda:1")}
        for name, p in model.named_parameters():
            assert p.device == dm.device_for_param(blocks, name)
        logits, trace, decoded = run(model, case, blocks["llm.embed"], cuda_graph=False)  # a graph spans one device
        assert logits.device == blocks["llm.lm_head"]
        torch.testing.assert_close(logits.to("cuda:0"), ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decoded.to("cuda:0"), ref_decoded, atol=1e-5, rtol=1e-5)
        assert trace.keys() == ref_trace.keys()
