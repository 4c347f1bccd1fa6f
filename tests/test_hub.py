"""from_pretrained with a hub id, offline: a temporary Hugging Face cache is pre-filled with the fixture checkpoint
laid out as the hub repository (models--ORG--NAME/snapshots/<commit>/..., refs/main), and HF_HUB_OFFLINE is on."""
from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest

import cogvlm.hub as hub
from cogvlm import CogVLM
from cogvlm.convert import CheckpointError, convert

from .test_generate import FIXTURES, MANIFEST, SINGLE, TOKENIZER, conversation

MODEL_DIR = FIXTURES / MANIFEST.get("model_dir", "model")
REPO = "testorg/tiny-cogvlm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hf_cache(cache, repo: str, files: dict, commit: str = COMMIT) -> None:
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copyfile(src, snapshot / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding the fixture checkpoint as REPO; cogvlm's cache in tmp too."""
    hf_cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("COGVLM_CACHE", str(tmp_path / "cogvlm"))
    put_in_hf_cache(hf_cache, REPO, {p.name: p for p in MODEL_DIR.iterdir()})
    return hf_cache


def test_hub_id_is_converted_once_and_reused_offline(offline, tmp_path, monkeypatch):
    put_in_hf_cache(offline, hub.TOKENIZER_REPO, {"tokenizer.model": TOKENIZER})  # the THUDM repos have none
    model = CogVLM.from_pretrained(REPO, device="cpu")
    converted = tmp_path / "cogvlm" / "testorg--tiny-cogvlm--main"
    assert (converted / "cogvlm_config.json").exists()
    assert (converted / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    answer = model.chat(**conversation(SINGLE[0]), max_new_tokens=4)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(hub, "convert", must_not_run)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", must_not_run)  # not even a cache look-up
    again = CogVLM.from_pretrained(REPO, device="cpu")
    assert again.chat(**conversation(SINGLE[0]), max_new_tokens=4) == answer


def test_pinned_revision_gets_its_own_cache_entry(offline, tmp_path):
    CogVLM.from_pretrained(REPO, revision=COMMIT, device="cpu", tokenizer=TOKENIZER)
    assert (tmp_path / "cogvlm" / f"testorg--tiny-cogvlm--{COMMIT}" / "tokenizer.model").exists()


def test_download_asks_for_weights_config_and_tokenizer_only(offline, monkeypatch):
    asked = {}

    def fake_snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(offline / "models--testorg--tiny-cogvlm" / "snapshots" / COMMIT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    hub.download(REPO, "main")
    assert asked["repo_id"] == REPO and asked["revision"] == "main"
    wanted = lambda name: any(fnmatch.fnmatch(name, p) for p in asked["allow_patterns"])  # noqa: E731
    for name in ["model-00001-of-00008.safetensors", "model.safetensors.index.json", "config.json",
                 "tokenizer.model"]:
        assert wanted(name), name
    for name in ["modeling_cogvlm.py", "configuration_cogvlm.py", "visual.py", "util.py", "pytorch_model.bin",
                 "pytorch_model-00001-of-00002.bin", "training_args.bin"]:
        assert not wanted(name), f"{name} must never be downloaded"


def test_uncached_hub_id_offline_is_a_clear_error(offline):
    with pytest.raises(CheckpointError, match="not .*in the local Hugging Face cache.*Go online.*local folder"):
        CogVLM.from_pretrained("testorg/not-downloaded", device="cpu")


def hub_folder_without_tokenizer(tmp_path):
    src = tmp_path / "cogvlm-tiny-hf"
    shutil.copytree(MODEL_DIR, src)  # the fixture ships no tokenizer.model
    return src


def test_without_a_tokenizer_offline_fails_at_once_in_one_line(offline, tmp_path):
    """A hub-layout folder or hub id with no tokenizer.model, and the Vicuna one not cached: a CheckpointError that
    says how to pass one, before anything is converted (it used to spend 25-29 s in retries, then load a model that
    could not chat)."""
    for name in (hub_folder_without_tokenizer(tmp_path), REPO):
        start = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            hub.resolve(name)
        assert time.monotonic() - start < 3, "no network attempts, no retries"
        message = str(e.value)
        assert "\n" not in message and "has no tokenizer.model" in message and "(HF_HUB_OFFLINE is set)" in message
        assert message.endswith("pass --tokenizer PATH/tokenizer.model (tokenizer=PATH in Python)")
    assert not (tmp_path / "cogvlm").exists() or not any((tmp_path / "cogvlm").iterdir())  # nothing converted


def test_an_unreachable_hub_is_asked_once_without_retries(offline, tmp_path, monkeypatch, caplog):
    """Not marked offline, but no hub (a closed port on 127.0.0.1): one request, then the same one-line error."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"the hub cannot be reached: .*\); pass --tokenizer PATH"):
        hub.resolve(hub_folder_without_tokenizer(tmp_path))
    assert time.monotonic() - start < 5
    assert "Retrying" not in caplog.text


def test_the_command_line_says_it_in_one_line(tmp_path):
    env = {**os.environ, "COGVLM_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "cogvlm", "ask", "none", "Hi", "--model",
                        str(hub_folder_without_tokenizer(tmp_path)), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("cogvlm ask: error: ") and "--tokenizer" in r.stderr


def test_a_cached_conversion_without_a_tokenizer_gets_one_once_cached(offline, tmp_path):
    """Conversions of earlier versions may lack the tokenizer: reusing one adds it from the HF cache, no network."""
    cached = convert(MODEL_DIR, tmp_path / "cogvlm" / "testorg--tiny-cogvlm--main")  # no tokenizer in it
    assert CogVLM.from_pretrained(REPO, device="cpu").tokenizer is None  # not cached either: loads as it is
    put_in_hf_cache(offline, hub.TOKENIZER_REPO, {"tokenizer.model": TOKENIZER})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = CogVLM.from_pretrained(REPO, device="cpu")
    assert model.tokenizer is not None and (cached / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
