"""`cogvlm caption` run for real, in subprocesses, on the fixture checkpoint (the fixtures and helpers of
tests/test_cli.py): one record per image, reruns, a killed run resumed, a full disk, file names that are not UTF-8,
boxes in the records."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cogvlm import CogVLM

from .test_cli import (DEFAULT_PROMPT, IMAGES, TIMEOUT, cogvlm, converted, env, model, read_jsonl,  # noqa: F401
                       run_bytes)


def make_folder(root: Path, n_made: int) -> tuple[list[Path], Path]:
    """A tree of images: the fixture PNGs, `n_made` more made with PIL in several formats and cases of extension,
    a corrupt .png and a text file. Returns (readable images in the CLI's order, the corrupt file)."""
    (root / "nested" / "deeper").mkdir(parents=True)
    shutil.copyfile(IMAGES[0], root / "a.png")
    shutil.copyfile(IMAGES[1], root / "nested" / "b.png")
    formats = [("JPG", "JPEG"), ("bmp", "BMP"), ("gif", "GIF"), ("tiff", "TIFF"), ("webp", "WEBP")]
    for i in range(n_made):
        ext, fmt = formats[i % len(formats)]
        folder = root / "nested" / "deeper" if i % 2 else root
        Image.new("RGB", (40 + 7 * i, 30 + 5 * i), (37 * i % 256, 90, 200 - 20 * i)).save(folder / f"m{i}.{ext}", fmt)
    corrupt = root / "nested" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (root / "notes.txt").write_text("not an image")
    readable = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".txt" and p != corrupt)
    return readable, corrupt


def check_captions(records: list[dict], readable: list[Path], corrupt: Path, model: CogVLM, converted: Path,
                   max_new_tokens: int) -> None:
    by_image = {r["image"]: r for r in records}
    assert len(by_image) == len(records) == len(readable) + 1, "not exactly one record per image"
    assert set(by_image) == {str(p) for p in readable + [corrupt]}
    error = by_image.pop(str(corrupt))
    assert set(error) == {"image", "error"} and "cannot read image" in error["error"]
    expected = model.chat_batch([str(p) for p in readable], [DEFAULT_PROMPT] * len(readable),
                                max_new_tokens=max_new_tokens)
    for path, caption in zip(readable, expected):
        assert by_image[str(path)] == {"image": str(path), "caption": caption, "prompt": DEFAULT_PROMPT,
                                       "model": str(converted)}


def test_caption_folder_gives_one_record_per_image_and_reruns_skip_them(tmp_path, converted, model, env):
    readable, corrupt = make_folder(tmp_path / "images", n_made=4)
    out = tmp_path / "captions.jsonl"
    args = ["caption", tmp_path / "images", "--out", out, "--model", converted, "--max-new-tokens", 6]
    r = cogvlm(*args, "--batch-size", 2, env=env)
    assert r.stdout == ""
    assert re.search(rf"skipped: cannot read image {re.escape(str(corrupt))}", r.stderr)
    n = len(readable) + 1
    assert re.search(rf"^caption {n}/{n} \[#+\], [\d.]+ (img/s|s/img), elapsed [\d:]+, ETA 0:00:00, 1 unreadable$",
                     r.stderr, re.M), r.stderr  # the rate after the first batch (batches of 2: there are more)
    assert re.search(r"after the first batch \(first batch [\d.]+ s\)", r.stderr)
    check_captions(read_jsonl(out), readable, corrupt, model, converted, 6)

    # A rerun finds everything done (the error record too) and does not even load the model.
    before = out.read_bytes()
    r = cogvlm(*args, env=env)
    assert out.read_bytes() == before and "already" in r.stderr and "loading" not in r.stderr

    # Once the file is repaired, --retry-errors replaces its error record by a caption.
    Image.new("RGB", (20, 20), (0, 255, 0)).save(corrupt, "PNG")
    r = cogvlm(*args, "--retry-errors", "--quiet", env=env)
    assert r.stderr == ""
    records = read_jsonl(out)
    assert len(records) == len(readable) + 1 and not any("error" in r for r in records)
    assert records[-1] == {"image": str(corrupt), "caption": model.chat(corrupt, DEFAULT_PROMPT, max_new_tokens=6),
                           "prompt": DEFAULT_PROMPT, "model": str(converted)}


def test_killed_caption_run_resumes_with_every_image_captioned_once(tmp_path, converted, model, env):
    readable, corrupt = make_folder(tmp_path / "images", n_made=6)
    out = tmp_path / "captions.jsonl"
    args = ["caption", tmp_path / "images", "--out", out, "--model", converted, "--max-new-tokens", 24]
    # One image per batch, each about a second on a CPU: kill the run as soon as its first record is on disk.
    proc = subprocess.Popen([sys.executable, "-m", "cogvlm", *map(str, args), "--batch-size", "1", "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out.exists() and b"\n" in out.read_bytes()):
            assert proc.poll() is None, f"the run ended early: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no record written in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    written = read_jsonl(out)  # every line whole and valid, the last one included
    assert 1 <= len(written) < len(readable) + 1, "the run was not killed half-way"

    # A write cut short by a crash (power loss) leaves an unfinished last line: the rerun refuses the file unchanged
    # (it cannot know the line is ours) and says what to do; with the line removed, the rerun goes on.
    whole = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"image": "' + str(readable[-1]).encode() + b'", "capt')
    cut = out.read_bytes()
    r = cogvlm(*args, "--batch-size", 3, env=env, check=False)
    assert r.returncode == 1 and out.read_bytes() == cut
    assert re.fullmatch(r"cogvlm caption: error: .*captions\.jsonl does not end with a line break: its last line is "
                        r"unfinished .*nothing was changed\. Remove or finish that last line, or give another --out\n",
                        r.stderr)
    out.write_bytes(whole)
    r = cogvlm(*args, "--batch-size", 3, env=env)
    assert f"{len(written)} already" in r.stderr
    records = read_jsonl(out)
    assert records[:len(written)] == written  # what the killed run finished is kept as it was
    check_captions(records, readable, corrupt, model, converted, 24)


def test_a_caption_run_that_fails_to_load_leaves_no_out_file(tmp_path, env):
    out = tmp_path / "captions.jsonl"
    r = cogvlm("caption", IMAGES[0], "--out", out, "--model", tmp_path / "nowhere", "--quiet", env=env, check=False)
    assert r.returncode == 1 and "is not a checkpoint folder" in r.stderr and not out.exists()


FULL_DISK = """
import errno, os, sys
real, lines = os.write, [0]
out = os.path.realpath(sys.argv[sys.argv.index("--out") + 1])

def write(fd, data):  # the second line written to --out hits a full disk
    if os.path.realpath(f"/proc/self/fd/{fd}") == out:
        lines[0] += 1
        if lines[0] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd, data)

os.write = write
from cogvlm.cli import main
main()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to find the output file's fd")
def test_a_full_disk_ends_a_caption_run_with_one_line_and_keeps_the_records(tmp_path, converted, model, env):
    out = tmp_path / "captions.jsonl"
    args = ["caption", *IMAGES, "--out", out, "--model", converted, "--max-new-tokens", 4, "--batch-size", 1, "--quiet"]
    r = subprocess.run([sys.executable, "-c", FULL_DISK, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=TIMEOUT)
    assert r.returncode == 1 and r.stderr == (f"cogvlm caption: error: cannot write to {out}: No space left on device; "
                                              "the 1 records written before are kept, rerun to go on\n")
    assert [rec["image"] for rec in read_jsonl(out)] == [str(IMAGES[0])]


def test_caption_a_folder_with_file_names_that_are_not_utf8(tmp_path, converted, model, env):
    root = tmp_path / "images"
    root.mkdir()
    good, bad = os.fsencode(root) + b"/photo-\xe9.png", os.fsencode(root) + b"/\xff-broken.png"
    shutil.copyfile(IMAGES[0], good)
    with open(bad, "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "captions.jsonl"
    args = ["caption", root, "--out", out, "--model", converted, "--max-new-tokens", 4]
    r = run_bytes(args, env)
    assert r.returncode == 0, r.stderr
    assert "skipped: cannot read image" in r.stderr and "broken.png" in r.stderr
    by_image = {rec["image"]: rec for rec in read_jsonl(out)}
    assert by_image[os.fsdecode(good)]["caption"] == model.chat(IMAGES[0], DEFAULT_PROMPT, max_new_tokens=4)
    assert "cannot read image" in by_image[os.fsdecode(bad)]["error"]
    r = run_bytes(args, env)  # the rerun finds both done
    assert r.returncode == 0 and "all 2 images already have a record" in r.stderr


def test_caption_boxes_puts_the_parsed_boxes_into_every_caption_record(tmp_path, converted, env):
    readable, corrupt = make_folder(tmp_path / "images", n_made=1)
    out = tmp_path / "boxes.jsonl"
    cogvlm("caption", tmp_path / "images", "--out", out, "--model", converted, "--max-new-tokens", 4, "--boxes",
           "--quiet", env=env)
    records = read_jsonl(out)
    captions = [r for r in records if "caption" in r]
    assert len(captions) == len(readable) and all(r["boxes"] == [] and r["problems"] == [] for r in captions)
    assert [set(r) for r in records if "error" in r] == [{"image", "error"}]  # error records stay as they are
