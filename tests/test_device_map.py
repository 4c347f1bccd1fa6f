"""Device maps (issue 5): parsing and validating hand-written maps, refusing devices this machine lacks, and a
mapped forward + cached decode that must equal the unmapped model exactly. The planner: tests/test_plan.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogvlm.parallel import device_map as dm
from cogvlm.parallel import plan as pl
from cogvlm.config import CogVLMConfig
from cogvlm.convert import convert
from cogvlm.generate import DecodeSession
from cogvlm import CogVLM
from cogvlm.visual_expert import ExpertRoute

FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CHAT = CogVLMConfig.from_name("cogvlm-chat-hf")
GiB = 2**30


def fake_gpus(monkeypatch, count: int) -> None:
    """Make torch believe this machine has `count` CUDA devices (nothing here touches them: maps are only read)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.fixture
def gpus(monkeypatch):
    fake_gpus(monkeypatch, 8)


# -- hand-written maps ---------------------------------------------------------------------------------------------
def test_parse_max_memory_units_and_devices():
    mm = pl.parse_max_memory("0=20GiB, 1=20GB,cuda:2=512MiB,3=512MB,cpu=1.5GiB")
    assert mm == {"cuda:0": 20 * GiB, "cuda:1": 20 * 10**9, "cuda:2": 512 * 2**20, "cuda:3": 512 * 10**6,
                  "cpu": int(1.5 * GiB)}
    for bad in ("0:20GiB", "0=20XB", "0=", "disk=1GiB", ""):
        with pytest.raises(dm.DeviceMapError):
            pl.parse_max_memory(bad)


def test_manual_map_prefixes_ranges_and_short_spellings(gpus):
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
def test_manual_map_errors_are_clear(bad, message, gpus):
    with pytest.raises(dm.DeviceMapError, match=message):
        dm.block_devices(bad, CHAT)


def test_unreadable_map_values_name_the_option_and_the_input(tmp_path):
    (tmp_path / "broken.json").write_text('{"vision": 0,')
    (tmp_path / "list.json").write_text('[["vision", 0]]')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe{")
    (tmp_path / "ok.json").write_text('{"vision": "cpu"}')
    cases = [('{"vision": 0', r"--device-map: the JSON object is not valid JSON \(.*line 1"),
             (str(tmp_path / "broken.json"), rf"--device-map: the file {tmp_path / 'broken.json'} is not valid JSON"),
             (str(tmp_path / "binary.json"), "is not valid JSON"),
             (str(tmp_path / "missing.json"), rf"--device-map: cannot read the map file {tmp_path / 'missing.json'} "
                                              r"\(No such file or directory\)"),
             (str(tmp_path / "list.json"), "must be a JSON object of block -> device"),
             ('{"vision": [0]}', "must be a JSON object of block -> device"),
             ("vision=0,layers", r"--device-map: cannot read 'vision=0,layers'; give auto, balanced")]
    for text, message in cases:
        with pytest.raises(dm.DeviceMapError, match=message):
            dm.parse_device_map(text)
    assert dm.parse_device_map(str(tmp_path / "ok.json")) == {"vision": "cpu"}


CPU_AND_GPU = "vision=cpu,adapter=cpu,embed=cpu,layers.0-15=cpu,layers.16-31={gpu},norm=cpu,lm_head=cpu"


@pytest.mark.parametrize("gpus_here, gpu, message", [
    (0, "0", r"names cuda:0, but this machine has no CUDA device \(torch.cuda.is_available\(\) is False\)"),
    (0, "cuda", "names cuda:0, but this machine has no CUDA device"),
    (2, "cuda:3", r"names cuda:3, but this machine has 2 CUDA device\(s\) \(cuda:0-1\)"),
])
def test_naming_a_gpu_this_machine_lacks_is_one_clear_error(monkeypatch, gpus_here, gpu, message):
    """Pairs, JSON and budgets alike, before anything touches CUDA (whose own error is a traceback)."""
    fake_gpus(monkeypatch, gpus_here)
    pairs = CPU_AND_GPU.format(gpu=gpu)
    as_json = json.dumps(dict(item.split("=") for item in pairs.split(",")))
    for text in (pairs, as_json):
        with pytest.raises(dm.DeviceMapError, match=r"the device map \(--device-map\) " + message):
            dm.block_devices(dm.parse_device_map(text), CHAT)
    with pytest.raises(dm.DeviceMapError, match=r"max_memory \(--max-memory\) " + message):
        pl.resolve_device_map("auto", CHAT, f"{gpu}=20GiB,cpu=60GiB")
    assert pl.plan(CHAT, f"{gpu}=40GiB").device_map  # planning for another machine stays possible


# -- execution -----------------------------------------------------------------------------------------------------
def test_move_to_rebuilds_containers_and_routes_only_when_needed():
    t = torch.arange(3)
    nested = (t, [t, {"a": t, "flag": True}], ExpertRoute.from_token_types(torch.tensor([[0, 1, 1, 1, 0]])), None)
    assert dm.move_to(nested, torch.device("cpu")) is nested  # nothing to move: the same objects
    moved = dm.move_to(nested, torch.device("meta"))
    assert moved[0].is_meta and moved[1][0].is_meta and moved[1][1]["a"].is_meta and moved[1][1]["flag"] is True
    tensors = [t for t in vars(moved[2]).values() if isinstance(t, torch.Tensor)]
    assert isinstance(moved[2], ExpertRoute) and len(tensors) == 3 and all(t.is_meta for t in tensors)
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
                                   plan_options={"batch_size": 1, "context": 2048})
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(pl.DoesNotFitError, match="batch"):
        CogVLM.from_pretrained(tiny, device="cpu", device_map="auto", max_memory=budget,
                               plan_options={"batch_size": 64, "context": 2048})


TINY_ON_GPU = "vision=cpu,adapter=cpu,embed=cpu,layers.0=cpu,layers.1=0,norm=cpu,lm_head=cpu"  # 2 decoder layers


@pytest.mark.parametrize("option", [["--device-map", TINY_ON_GPU], ["--max-memory", "0=1GiB,cpu=2GiB"]])
def test_a_gpu_map_without_gpus_fails_before_any_weight_is_read(tiny, monkeypatch, capsys, option):
    """Through from_pretrained and the command line: one line naming the option, nothing read from the checkpoint."""
    import cogvlm.cli
    import cogvlm.loading

    fake_gpus(monkeypatch, 0)

    def must_not_open(*args, **kwargs):
        raise AssertionError("a shard was opened before the map was refused")

    monkeypatch.setattr(cogvlm.loading, "open_shard", must_not_open)
    with pytest.raises(dm.DeviceMapError, match="no CUDA device"):
        CogVLM.from_pretrained(tiny, device="cpu", device_map=dm.parse_device_map(TINY_ON_GPU))
    assert cogvlm.cli.main(["ask", "none", "Hi", "--model", str(tiny), "--quiet", *option]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cogvlm ask: error: ") and err.count("\n") == 1, err
    assert f"({option[0]}) names cuda:0, but this machine has no CUDA device" in err


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_equal_one(tiny):
    case = image_case()
    one = CogVLM.from_pretrained(tiny, device="cuda:0", dtype=torch.float32)
    ref_logits, ref_trace, ref_decoded = run(one, case, "cuda:0")
    cpu_logits = run(CogVLM.from_pretrained(tiny, device="cpu", dtype=torch.float32), case, "cpu", 0)[0]
    torch.testing.assert_close(ref_logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)
    for device_map in (split_map(one.cfg, "cuda:0", "cuda:1"), split_map(one.cfg, "cuda:1", "cuda:0"),
                       pl.plan(one.cfg, {0: 2**30, 1: 2**30}, context=64, dtype=torch.float32, strategy="balanced")):
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
