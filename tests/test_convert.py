"""Conversion and loading: layouts, round trip, atomicity, and a clear error for every kind of bad checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogvlm.convert import CheckpointError, convert, export_hf
from cogvlm import shards as ckpt
from cogvlm import CogVLM

FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
MODEL_DIR = FIXTURES / json.loads((FIXTURES / "manifest.json").read_text()).get("model_dir", "model")


def hub_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(MODEL_DIR / "model.safetensors"))


def write_hub_folder(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int = 3, fmt: str = "safetensors",
                     config: dict | None = None) -> Path:
    """A folder laid out like a hub repository: config.json plus `n_shards` shards and their index.

    Keys are dealt round-robin, so the two halves of every fused gate/up pair land in different shards."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODEL_DIR / "config.json", folder / "config.json")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        part = {k: tensors[k].clone() for k in names[i::n_shards]}
        if fmt == "safetensors":
            file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(part, str(folder / file))
        else:
            file = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
            torch.save(part, folder / file)
        weight_map.update({k: file for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file, _ in ckpt.list_shards(folder):
        out.update(load_file(str(file)))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_is_bit_identical(tmp_path):
    ours = convert(MODEL_DIR, tmp_path / "ours")
    back = export_hf(ours, tmp_path / "hub")
    assert_same_tensors(read_folder(back), hub_tensors())
    assert json.loads((back / "config.json").read_text()) == json.loads((MODEL_DIR / "config.json").read_text())


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_sources_give_the_same_result(tmp_path, fmt):
    reference = read_folder(convert(MODEL_DIR, tmp_path / "single"))
    src = write_hub_folder(tmp_path / "src", hub_tensors(), n_shards=3, fmt=fmt)
    assert_same_tensors(read_folder(convert(src, tmp_path / "sharded")), reference)


def test_single_bin_file_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(MODEL_DIR / "config.json", src / "config.json")
    torch.save(hub_tensors(), src / "pytorch_model.bin")
    reference = read_folder(convert(MODEL_DIR, tmp_path / "a"))
    assert_same_tensors(read_folder(convert(src, tmp_path / "b")), reference)


def test_dtype_and_output_sharding(tmp_path):
    out = convert(MODEL_DIR, tmp_path / "bf16", dtype="bf16", max_shard_bytes=2_000_000)
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 1 and all(f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    tensors = read_folder(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    hub = hub_tensors()
    assert torch.equal(tensors["llm.embed.weight"], hub["model.embed_tokens.weight"].bfloat16())
    model = CogVLM.from_pretrained(out, device="cpu", dtype="bf16")
    assert model.llm.embed.weight.dtype == torch.bfloat16


def test_tokenizer_is_stored_with_the_weights(tmp_path):
    tok = Path(__file__).parent / "fixtures" / "tokenizer" / "tokenizer.model"
    out = convert(MODEL_DIR, tmp_path / "ours", tokenizer=tok)
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()


def test_existing_destination_needs_force(tmp_path):
    out = convert(MODEL_DIR, tmp_path / "ours")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(MODEL_DIR, out)
    convert(MODEL_DIR, out, force=True)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ckpt.ShardWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(ckpt.ShardWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        convert(MODEL_DIR, tmp_path / "ours", max_shard_bytes=1000)
    assert list(tmp_path.iterdir()) == []


def killed_while_writing(dst: Path) -> Path:
    """Run atomic_folder(dst) in a process that is SIGKILLed half way: what a killed conversion leaves behind."""
    code = ("import os, signal, sys; from pathlib import Path; from cogvlm.shards import atomic_folder\n"
            "with atomic_folder(Path(sys.argv[1])) as tmp:\n"
            "    (tmp / 'model-00001.safetensors').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code, str(dst)], env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL
    (left,) = dst.parent.glob(f".{dst.name}.tmp-*")
    return left


def fake_temp_folder(parent: Path, name: str, pid: int, host: str | None = None) -> Path:
    folder = parent / f".{name}.tmp-{pid}"
    folder.mkdir(parents=True)
    (folder / ckpt.TEMP_MARK).write_text(f"{host or socket.gethostname()} {pid}\n")
    return folder


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid  # gone (its number could be reused, which would only make us keep its folder)


@pytest.mark.skipif(os.name != "posix", reason="process liveness is checked with POSIX signals")
def test_a_killed_conversion_is_cleaned_up_by_the_next_run(tmp_path):
    left = killed_while_writing(tmp_path / "ours")
    live = fake_temp_folder(tmp_path, "other", os.getppid())  # a running process (pytest's parent) writes here
    remote = fake_temp_folder(tmp_path, "remote", dead_pid(), host="another-host")  # a shared disk: not ours
    foreign = tmp_path / f".notes.tmp-{dead_pid()}"  # the same shape of name, but no mark of ours
    foreign.mkdir()
    convert(MODEL_DIR, tmp_path / "ours")
    assert not left.exists()
    assert live.exists() and remote.exists() and foreign.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, remote.name, foreign.name, "ours"])
    assert not (tmp_path / "ours" / ckpt.TEMP_MARK).exists()  # the mark goes before the rename


@pytest.mark.skipif(os.name != "posix", reason="process liveness is checked with POSIX signals")
def test_the_cache_is_cleaned_of_killed_conversions(tmp_path, monkeypatch):
    """In $COGVLM_CACHE a killed conversion has a key that may never come again (the source changed): any use of
    the cache clears it, even one that converts nothing."""
    import cogvlm.hub as hub

    monkeypatch.setenv("COGVLM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src-hf"
    shutil.copytree(MODEL_DIR, src)
    shutil.copyfile(Path(__file__).parent / "fixtures" / "tokenizer" / "tokenizer.model", src / "tokenizer.model")
    converted = hub.resolve(src)
    left = killed_while_writing(tmp_path / "cache" / "local--old-version--0123456789abcdef")
    live = fake_temp_folder(tmp_path / "cache", "local--in-progress--0123456789abcdef", os.getppid())
    assert hub.resolve(src) == converted  # a cache hit
    assert not left.exists() and live.exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_usual_permissions(tmp_path, umask, mode):
    """safetensors writes 0600; every file we write follows the umask like any other (0644 by default)."""
    old = os.umask(umask)
    try:
        out = export_hf(convert(MODEL_DIR, tmp_path / "ours", max_shard_bytes=2_000_000), tmp_path / "hub")
        ckpt.write_tensors(tmp_path / "ours", "state", [("a", torch.zeros(3))])
    finally:
        os.umask(old)
    files = [p for folder in (tmp_path / "ours", out) for p in folder.iterdir()]
    assert len([p for p in files if p.suffix == ".safetensors"]) > 3
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


# -- bad inputs: each one a clear error that names the problem, and no output folder --------------------------------

def expect_error(tmp_path, src, match):
    with pytest.raises(CheckpointError, match=match) as info:
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())
    return str(info.value)


def test_missing_shard(tmp_path):
    src = write_hub_folder(tmp_path / "src", hub_tensors())
    (src / "model-00002-of-00003.safetensors").unlink()
    expect_error(tmp_path, src, "model-00002-of-00003.safetensors")


def test_truncated_safetensors(tmp_path):
    src = write_hub_folder(tmp_path / "src", hub_tensors())
    shard = src / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    msg = expect_error(tmp_path, src, "truncated")
    assert "model-00003-of-00003.safetensors" in msg


def test_wrong_shape(tmp_path):
    tensors = hub_tensors()
    tensors["model.layers.0.self_attn.language_expert_dense.weight"] = torch.zeros(3, 3)
    src = write_hub_folder(tmp_path / "src", tensors)
    msg = expect_error(tmp_path, src, "shape")
    assert "language_expert_dense" in msg


def test_unequal_fused_halves(tmp_path):
    tensors = hub_tensors()
    up = "model.layers.1.mlp.vision_mlp.up_proj.weight"
    tensors[up] = tensors[up][:-1].clone()
    expect_error(tmp_path, write_hub_folder(tmp_path / "src", tensors), "up_proj")


def test_unknown_key(tmp_path):
    tensors = hub_tensors()
    tensors["model.layers.0.self_attn.extra_bias"] = torch.zeros(4)
    msg = expect_error(tmp_path, write_hub_folder(tmp_path / "src", tensors), "unknown")
    assert "model.layers.0.self_attn.extra_bias" in msg


def test_missing_key(tmp_path):
    tensors = hub_tensors()
    del tensors["model.vision.eoi"]
    expect_error(tmp_path, write_hub_folder(tmp_path / "src", tensors), "model.vision.eoi")


def test_config_of_another_model(tmp_path):
    config = json.loads((MODEL_DIR / "config.json").read_text())
    config["num_hidden_layers"] += 1
    src = write_hub_folder(tmp_path / "src", hub_tensors(), config=config)
    expect_error(tmp_path, src, "missing")


class NotATensor:
    """Stands for any pickled object; unpickling it with weights_only=True must be refused."""

    def __reduce__(self):
        return (print, ("this would have run",))


def test_bin_with_pickled_object_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(MODEL_DIR / "config.json", src / "config.json")
    torch.save({"model.vision.boi": NotATensor()}, src / "pytorch_model.bin")
    msg = expect_error(tmp_path, src, "weights_only")
    assert "pytorch_model.bin" in msg
    assert "this would have run" not in capsys.readouterr().out


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        convert(tmp_path / "src", tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out")


# -- loading -------------------------------------------------------------------------------------------------------

def test_loader_is_strict(tmp_path):
    out = convert(MODEL_DIR, tmp_path / "ours")
    shard = next(out.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    save_file({**tensors, "llm.extra": torch.zeros(1)}, str(shard))
    with pytest.raises(CheckpointError, match="llm.extra"):
        CogVLM.from_pretrained(out, device="cpu")

    del tensors["llm.norm.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="llm.norm.weight"):
        CogVLM.from_pretrained(out, device="cpu")


def test_loaded_model_has_no_meta_tensors(tmp_path):
    model = CogVLM.from_pretrained(convert(MODEL_DIR, tmp_path / "ours"), device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32  # CPU default
    with safe_open(str(next((tmp_path / "ours").glob("model-*.safetensors"))), "pt") as f:
        assert torch.equal(model.adapter.boi, f.get_tensor("adapter.boi"))
