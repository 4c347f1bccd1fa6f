"""cogvlm.caption: the captioning job in-process on the shipped tiny model (examples/tiny-shapes), its output file's
safety (never touch what is not ours, keep what was written, nothing left behind by a failed start) and odd inputs.
The command line around it is tested in tests/test_cli_caption.py."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cogvlm import CogVLM
from cogvlm import caption as job
from cogvlm.caption import CaptionFile, run_caption_job

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny-shapes"
SHAPES = sorted((REPO / "examples" / "images").glob("*.png"))
PROMPT = "Describe the image."
GEN = dict(max_new_tokens=8)


@pytest.fixture(scope="module")
def model() -> CogVLM:
    return CogVLM.from_pretrained(TINY, device="cpu", dtype=torch.float32)


def folder(tmp_path: Path, n: int = 5) -> Path:
    """`n` shape images (the shipped ones, repeated under other names)."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(n):
        shutil.copyfile(SHAPES[i % len(SHAPES)], root / f"{i:03d}.png")
    return root


def no_loading():
    raise AssertionError("the model was loaded, but nothing should have needed it")


def run(model, paths, out, **kw):
    kw = {"prompt": PROMPT, "generation": GEN, "model_name": "tiny", "progress": False, "batch_size": 2, **kw}
    return run_caption_job(model, [paths] if isinstance(paths, (str, Path)) else paths, out, **kw)


def records(out: Path) -> list[dict]:
    data = out.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def expected(model, path) -> dict:
    """What the API gives for one image alone: the job must write exactly that."""
    return {"image": os.path.normpath(path), "caption": model.chat(path, PROMPT, **GEN), "prompt": PROMPT,
            "model": "tiny"}


def test_job_decodes_each_image_once_and_hands_pixels_to_chat_batch_one_batch_at_a_time(tmp_path, model,
                                                                                            monkeypatch):
    root = folder(tmp_path, 5)
    decoded, calls = [], []
    real_load = job.load_image
    monkeypatch.setattr(job, "load_image", lambda src, *a, **k: decoded.append(src) or real_load(src, *a, **k))

    class Watched:  # the real model, with its chat_batch calls recorded
        cfg = model.cfg

        def chat_batch(self, images, queries, **kw):
            calls.append(([type(i) for i in images], kw["batch_size"]))
            return model.chat_batch(images, queries, **kw)

    out = tmp_path / "captions.jsonl"
    result = run(lambda: Watched(), root, out, batch_size=2)
    paths = sorted(str(p) for p in root.iterdir())
    assert sorted(decoded) == paths  # once each, from the file
    assert [len(types) for types, _ in calls] == [2, 2, 1] and all(n is None for _, n in calls)  # one batch each
    assert all(t is torch.Tensor for types, _ in calls for t in types)  # preprocessed in the decoding threads
    assert records(out) == [expected(model, p) for p in paths]
    assert (result.captioned, result.errors, result.skipped, result.images) == (5, 0, 0, 5)

    again = run(no_loading, root, out)  # everything done: the loader is not even called
    assert (again.captioned, again.skipped) == (0, 5)


def test_rate_leaves_the_first_batch_out(tmp_path, model, monkeypatch):
    """A warm-up batch of 10 s and then 1 s per batch of 2: 2 images/s, not the 6 / 13 s a whole-run average says."""
    clock = [0.0]
    monkeypatch.setattr(job, "monotonic", lambda: clock[0])

    class Timed:
        cfg = model.cfg
        calls = 0

        def chat_batch(self, images, queries, **kw):
            clock[0] += 10.0 if Timed.calls == 0 else 1.0
            Timed.calls += 1
            return model.chat_batch(images, queries, **kw)

    result = run(Timed(), folder(tmp_path, 6), tmp_path / "c.jsonl", batch_size=2)
    assert result.first_batch_seconds == 10.0 and result.steady_images_per_s == 2.0 and result.seconds == 12.0
    assert "2.00 img/s after the first batch (first batch 10.0 s)" in job.summary(result, "c.jsonl")


def test_non_utf8_file_names_are_captioned_recorded_and_skipped_on_rerun(tmp_path, model):
    """A name in another encoding (Latin-1 from an old camera or a zip) is a path like any other: it is captioned,
    its record names it (JSON escapes that Python reads back as the same path) and a rerun skips it."""
    root = folder(tmp_path, 2)
    odd = [os.fsdecode(os.fsencode(root) + b"/caf\xe9.png"), os.fsdecode(os.fsencode(root) + b"/\xff\xfe.png")]
    for name in odd:
        shutil.copyfile(SHAPES[1], name)
    broken = os.fsdecode(os.fsencode(root) + b"/broken-\xe9.png")
    Path(broken).write_bytes(b"not a png")
    out = tmp_path / "captions.jsonl"
    warnings = []
    result = run(model, root, out, warn=warnings.append)
    assert (result.captioned, result.errors) == (4, 1)
    by_image = {r["image"]: r for r in records(out)}  # every line valid JSON
    for name in odd:
        assert by_image[name]["caption"] == model.chat(SHAPES[1], PROMPT, **GEN)
        assert os.path.exists(by_image[name]["image"])  # the recorded path opens the file
    assert set(by_image[broken]) == {"image", "error"} and len(warnings) == 1 and "broken-" in warnings[0]
    assert run(no_loading, root, out).skipped == 5


# -- the output file: never touch what is not ours --------------------------------------------------------------

NOT_OURS = {
    "a record without a final newline": b'{"image": "x.png", "caption": "a cat", "prompt": "p", "model": "tiny"}',
    "a line cut short": b'{"image": "a.png", "caption": "a", "prompt": "p", "model": "tiny"}\n{"image": "b.p',
    "another JSONL": b'{"id": 1, "text": "hello"}\n',
    "JSON that is no object": b'["image", "caption"]\n',
    "a record without caption or error": b'{"image": "a.png"}\n',
    "not UTF-8": b'{"image": "a.png", "caption": "\xff"}\n',
    "a binary file": bytes(range(256)) * 4 + b"\n",
    "text": b"Some notes\nthat someone keeps here.\n",
}


@pytest.mark.parametrize("what", NOT_OURS)
def test_a_file_that_is_not_ours_is_refused_before_anything_changes(what, tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_bytes(NOT_OURS[what])
    os.utime(out, (1_000_000_000, 1_000_000_000))
    with pytest.raises(ValueError, match="nothing was changed") as e:
        run(no_loading, folder(tmp_path, 2), out, retry_errors=True)
    assert str(out) in str(e.value) and "\n" not in str(e.value)
    assert out.read_bytes() == NOT_OURS[what] and out.stat().st_mtime == 1_000_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl", "images"]  # no temporary file either


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_out_must_be_a_regular_file(kind, tmp_path):
    out = tmp_path / "out"
    out.mkdir() if kind == "folder" else os.mkfifo(out)
    with pytest.raises(ValueError, match="not a regular file"):
        run(no_loading, folder(tmp_path, 1), out)


def test_a_failed_start_leaves_no_file_behind(tmp_path):
    out = tmp_path / "captions.jsonl"

    def failing_load():
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        run(failing_load, folder(tmp_path, 2), out)
    assert not out.exists()


@pytest.mark.parametrize("option", ["--prompt", "--model"])
def test_a_rerun_with_another_prompt_or_model_is_refused(option, tmp_path, model):
    root = folder(tmp_path, 3)
    out = tmp_path / "captions.jsonl"
    run(model, [root / "000.png"], out)
    before = out.read_bytes()
    other = {"prompt": "What shape is it?"} if option == "--prompt" else {"model_name": "another-model"}
    old, new = (PROMPT, "What shape is it?") if option == "--prompt" else ("tiny", "another-model")
    message = f"made with {option} '{old}', not '{new}': give {option} '{old}' to continue that file, or another --out"
    for paths in ([root / "000.png"], root):  # nothing left to do, or more images: refused either way
        with pytest.raises(ValueError, match=re.escape(message)):
            run(no_loading, paths, out, **other)
    assert out.read_bytes() == before
    assert run(model, root, out).captioned == 2  # the same prompt and model continue the file


def test_the_default_prompt_is_checked_once_the_template_is_known(tmp_path, model):
    root = folder(tmp_path, 2)
    out = tmp_path / "captions.jsonl"
    run(model, [root / "000.png"], out, prompt="A picture of")
    with pytest.raises(ValueError, match="made with --prompt 'A picture of', not 'Describe this image.'"):
        run(model, root, out, prompt=None)  # the chat template's default prompt
    assert len(records(out)) == 1


# -- the output file: a failing write keeps what was written ----------------------------------------------------

def failing_writes(monkeypatch, out: Path, after: int, error: int, partial: bool):
    """os.write to `out` fails from its `after`+1-th line on (a full disk, an I/O error); with `partial`, the failing
    write first puts half its line on disk, as a real short write can."""
    real = os.write
    count = [0]

    def write(fd, data):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(out.resolve()):
            count[0] += 1
            if count[0] > after:
                if partial:
                    real(fd, data[: len(data) // 2])
                raise OSError(error, os.strerror(error))
        return real(fd, data)

    monkeypatch.setattr(job.os, "write", write)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to find the output file's fd")
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("partial", [False, True])
def test_a_failing_write_ends_the_run_with_what_was_written_kept(error, partial, tmp_path, model, monkeypatch):
    root = folder(tmp_path, 5)
    out = tmp_path / "captions.jsonl"
    failing_writes(monkeypatch, out, after=3, error=error, partial=partial)
    with pytest.raises(OSError) as e:
        run(model, root, out, batch_size=2)
    message = str(e.value)
    assert message.startswith(f"cannot write to {out}: {os.strerror(error)}; the 3 records written before are kept")
    assert records(out) == [expected(model, p) for p in sorted(root.iterdir())[:3]]  # whole lines only
    monkeypatch.undo()
    assert run(model, root, out).captioned == 2  # a rerun goes on from there
    assert records(out) == [expected(model, p) for p in sorted(root.iterdir())]


def test_a_short_write_is_a_full_disk(tmp_path, model, monkeypatch):
    out = tmp_path / "captions.jsonl"
    real = os.write
    monkeypatch.setattr(job.os, "write", lambda fd, data: real(fd, data[:5]))
    with pytest.raises(OSError, match=r"cannot write to .*: No space left on device \(short write\); the 0 records"):
        run(model, folder(tmp_path, 1), out)
    assert out.read_bytes() == b""  # the 5 bytes were cut away again


def test_two_runs_cannot_write_one_file(tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_bytes(b"")
    with CaptionFile(out):
        with pytest.raises(OSError, match="being written by another"):
            CaptionFile(out)


def test_retry_errors_rewrites_only_our_file_and_keeps_one_line_per_image(tmp_path, model):
    root = folder(tmp_path, 2)
    broken = root / "zz-broken.png"
    broken.write_bytes(b"garbage")
    out = tmp_path / "captions.jsonl"
    assert run(model, root, out, warn=lambda m: None).errors == 1
    shutil.copyfile(SHAPES[0], broken)
    result = run(model, root, out, retry_errors=True)
    assert (result.captioned, result.skipped) == (1, 2)
    assert [r["image"] for r in records(out)] == [str(root / "000.png"), str(root / "001.png"), str(broken)]
    assert "error" not in records(out)[-1]


def test_the_benchmark_measures_captioning_through_the_job_on_jpeg_files():
    """bench/bench.py's captioning figure, as its CPU smoke run does it (tiny config, random weights)."""
    import argparse

    from bench.bench import run_caption

    args = argparse.Namespace(device="cpu", preset=str(TINY), caption_images=5, caption_batch=2, caption_tokens=3,
                              caption_size="64x48")
    r = run_caption(args)
    assert r["caption_images"] == 5 and r["caption_first_batch_s"] > 0 and r["caption_images_s"] > 0
    assert r["caption_total_s"] >= r["caption_first_batch_s"]


def test_boxes_are_parsed_into_each_record_in_the_original_images_pixels(tmp_path, model):
    """A grounding model's captions ("... [[x0,y0,x1,y1]] ...") become boxes in 000-999 and in pixels of each image as
    it is on disk (not the square the model saw); a caption without boxes gets an empty list; without `boxes` the
    records are unchanged."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (400, 100), (255, 0, 0)).save(root / "wide.png")  # red: the model "sees" two boxes
    Image.new("RGB", (50, 300), (0, 0, 255)).save(root / "tall.png")  # blue: no box
    boxed = "a red circle [[100,200,500,600]] and a box [[000,000,999,999]]"

    class Grounder:  # the real model's config; answers as a grounding model would
        cfg = model.cfg

        def chat_batch(self, images, queries, **kw):
            return [boxed if pixels[0].mean() > pixels[2].mean() else "nothing here" for pixels in images]

    out = tmp_path / "boxes.jsonl"
    run(Grounder(), root, out, boxes=True, batch_size=2)
    got = {Path(r["image"]).name: r for r in records(out)}
    first, second = got["wide.png"], got["tall.png"]
    assert first["caption"] == boxed and first["problems"] == [] and second["caption"] == "nothing here"
    w, h = 400, 100
    assert first["boxes"] == [
        {"phrase": "a red circle", "box": [100, 200, 500, 600],
         "pixels": [round(100 / 1000 * w, 1), round(200 / 1000 * h, 1), round(500 / 1000 * w, 1),
                    round(600 / 1000 * h, 1)]},
        {"phrase": "a box", "box": [0, 0, 999, 999], "pixels": [0.0, 0.0, round(999 / 1000 * w, 1),
                                                                 round(999 / 1000 * h, 1)]}]
    assert second["boxes"] == [] and second["problems"] == []

    plain = tmp_path / "plain.jsonl"
    run(Grounder(), root, plain, batch_size=2)
    assert all(set(r) == {"image", "caption", "prompt", "model"} for r in records(plain))
