"""cogvlm.batching: `--batch-size auto` takes the largest batch whose KV caches and temporaries fit in the memory
left after loading, on every device of the model; the CLI and the caption job take it (CPU: 8)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cogvlm.batching as batching
from cogvlm import CogVLM
from cogvlm.caption import run_caption_job
from cogvlm.parallel.device_map import block_names

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny-shapes"
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def model():
    return CogVLM.from_pretrained(TINY, device="cpu", dtype=torch.float32)


def kv_bytes(model, rows: int, context: int, dtype=torch.bfloat16) -> int:
    """What a decode session of `rows` x `context` really allocates for its caches."""
    return sum(c.k.nbytes + c.v.nbytes for c in model.new_kv_caches(rows, context, dtype=dtype))


def on(model, device: str) -> dict[str, str]:
    return {name: device for name in block_names(model.cfg)}


def test_the_batch_chosen_fits_and_one_more_row_would_not(model):
    context, dtype = 512, torch.bfloat16
    one_row = batching.rows_that_fit(model.cfg, {"cuda:0": 10**12}, on(model, "cuda:0"), context, dtype, 1.0)
    per_row = 10**12 // one_row  # bytes a row needs, as counted
    assert per_row >= kv_bytes(model, 1, context)  # at least its KV cache, which is what a session allocates
    for rows in (1, 3, 17):
        free = rows * per_row + per_row // 2
        got = batching.rows_that_fit(model.cfg, {"cuda:0": free}, on(model, "cuda:0"), context, dtype, 1.0)
        assert got == rows
        assert kv_bytes(model, got, context) <= free < (got + 1) * per_row
    # headroom is taken off the free memory; a longer context leaves room for fewer rows
    assert batching.rows_that_fit(model.cfg, {"cuda:0": 10 * per_row}, on(model, "cuda:0"), context, dtype, 0.5) == 5
    assert batching.rows_that_fit(model.cfg, {"cuda:0": 10 * per_row}, on(model, "cuda:0"), 2 * context, dtype,
                                  1.0) < 10


def test_over_a_device_map_the_tightest_device_decides(model):
    names = block_names(model.cfg)
    half = len(names) // 2
    placement = {n: ("cuda:0" if i < half else "cuda:1") for i, n in enumerate(names)}
    alone = batching.rows_that_fit(model.cfg, {"cuda:0": 10**9, "cuda:1": 10**12}, placement, 256, torch.bfloat16)
    other = batching.rows_that_fit(model.cfg, {"cuda:0": 10**12, "cuda:1": 10**9}, placement, 256, torch.bfloat16)
    both = batching.rows_that_fit(model.cfg, {"cuda:0": 10**9, "cuda:1": 10**9}, placement, 256, torch.bfloat16)
    assert both == min(alone, other) > 0


def test_auto_on_the_cpu_is_eight_and_on_a_gpu_is_capped(model, monkeypatch):
    assert batching.auto_batch_size(model, PROMPT, "chat", 16) == batching.CPU_BATCH == 8
    monkeypatch.setattr(batching, "_device_of", lambda module: torch.device("cuda:0"))  # as if loaded on a GPU
    monkeypatch.setattr(batching, "_free_bytes", lambda device: 10**13)
    assert batching.auto_batch_size(model, PROMPT, "chat", 16) == batching.MAX_BATCH
    monkeypatch.setattr(batching, "_free_bytes", lambda device: 1)
    assert batching.auto_batch_size(model, PROMPT, "chat", 16) == 1  # never 0: the run then says what does not fit


def test_the_context_counts_the_prompt_and_the_new_tokens(model, monkeypatch):
    seen = []
    monkeypatch.setattr(batching, "_device_of", lambda module: torch.device("cuda:0"))
    monkeypatch.setattr(batching, "_free_bytes", lambda device: 10**9)
    monkeypatch.setattr(batching, "rows_that_fit", lambda cfg, free, placement, context, dtype: seen.append(context) or 4)
    batching.auto_batch_size(model, PROMPT, "chat", 16)
    batching.auto_batch_size(model, PROMPT, "chat", 300)
    batching.auto_batch_size(model, PROMPT, "chat", None)
    image_and_prompt = 1 + model.cfg.num_image_tokens  # at least: bos, the image, the prompt's tokens
    assert seen[0] >= image_and_prompt + 16 and seen[0] % 256 == 0  # rounded up as decode sessions are
    assert seen[1] == seen[2] == model.cfg.text.max_position_embeddings  # (512 for the tiny model)


def test_the_caption_job_takes_auto(tmp_path, model, capsys):
    images = sorted((REPO / "examples" / "images").iterdir())
    calls = []

    class Watched:
        cfg = model.cfg

        def __getattr__(self, name):
            return getattr(model, name)

        def chat_batch(self, images, queries, **kw):
            calls.append(len(images))
            return model.chat_batch(images, queries, **kw)

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i:02d}.png").write_bytes(images[i % len(images)].read_bytes())
    result = run_caption_job(Watched(), [folder], tmp_path / "c.jsonl", prompt=PROMPT, batch_size="auto",
                             generation={"max_new_tokens": 4}, model_name="tiny", progress=True)
    assert calls == [8, 2] and result.batch_size == 8  # a model on the CPU: batches of 8
    assert "batch size 8 (--batch-size auto" in capsys.readouterr().err
    run_caption_job(Watched(), [folder], tmp_path / "quiet.jsonl", prompt=PROMPT, batch_size="auto",
                    generation={"max_new_tokens": 4}, model_name="tiny", progress=False)
    assert "batch size" not in capsys.readouterr().err  # quiet: no progress, no note


@pytest.mark.parametrize("value, ok", [("auto", True), ("3", True), ("0", False), ("many", False)])
def test_the_cli_reads_auto_or_a_positive_number(value, ok):
    code = ("import sys; from cogvlm.cli import build_parser; "
            f"a = build_parser().parse_args(['caption', 'x', '--out', 'o.jsonl', '--batch-size', '{value}']); "
            "print(repr(a.batch_size))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if ok:
        assert r.returncode == 0 and r.stdout.strip() in ("'auto'", value), r.stderr
    else:
        assert r.returncode == 2 and "--batch-size" in r.stderr and value in r.stderr
