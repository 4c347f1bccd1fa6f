"""The torchrun caption job (cogvlm/caption_dist.py), for real: `python -m torch.distributed.run` with 2 and 3 CPU
processes on 127.0.0.1 (and --standalone), the shipped tiny-shapes model, 60 Shapes images plus a broken file. Every
distributed run must give, line for line, what the single-process `cogvlm caption` gives; that run itself is checked
against the Shapes answers.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from cogvlm.caption_dist import KILL_ENV, JobLock, parts_folder, torchrun_device
from cogvlm.cli import main
from cogvlm.shapes import generate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-shapes"
PROMPT = "Describe the image."  # the question the tiny model learned
OPTIONS = ["--prompt", PROMPT, "--batch-size", "4", "--max-new-tokens", "8"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    data = generate(tmp_path_factory.mktemp("shapes") / "set", 60, seed=5, questions="describe")
    (data.parent / "images" / "000030-broken.png").write_bytes(b"not an image")  # in the middle of the order
    return data.parent / "images"


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> list[str]:
    """The lines of the single-process run (cogvlm caption, in this process)."""
    out = tmp_path_factory.mktemp("reference") / "captions.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks run (OMP_NUM_THREADS=1): two threads on a busy machine are slower
    try:
        assert main(["caption", str(images), "--model", str(TINY), "--out", str(out), "--quiet", *OPTIONS]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["image"] for r in records] == sorted(str(p) for p in images.iterdir())
    truth = {str(images.parent / json.loads(line)["image"]): json.loads(line)["conversations"][1]["content"]
             for line in (images.parent / "data.jsonl").read_text().splitlines()}
    right = sum(r.get("caption") == truth.get(r["image"]) for r in records)
    assert right >= 54, f"the tiny model names only {right} of 60 shapes"  # it has learned them: the captions mean it
    assert [r["image"] for r in records if "error" in r] == [str(images / "000030-broken.png")]
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(processes: int, images: Path, out: Path, *options: str, env: dict | None = None,
             standalone: bool = False) -> subprocess.CompletedProcess:
    launch = ["--standalone"] if standalone else ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", *launch,
               "-m", "cogvlm", "caption", str(images), "--model", str(TINY), "--out", str(out), *OPTIONS, *options]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def part_lines(out: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted(parts_folder(out).glob("part-*.jsonl"))}


def test_three_ranks_caption_every_image_once_as_one_process_does(images, reference, tmp_path):
    out = tmp_path / "captions.jsonl"
    run = torchrun(3, images, out)
    assert run.returncode == 0, run.stderr
    assert out.read_text().splitlines() == reference  # one line per image, in the input's order, the same captions
    assert not parts_folder(out).exists() and not JobLock(out).path.exists()
    assert "61 images to caption over 3 process(es)" in run.stderr
    counts = re.search(r"images per rank: 0: (\d+), 1: (\d+), 2: (\d+)", run.stderr)
    assert counts and sum(map(int, counts.groups())) == 61, run.stderr
    # One bar for the whole job (rank 0's). Not anchored at line starts: the ranks share one stderr, and a line another
    # rank (or torch's C++ logging, which writes in pieces) was writing at that moment may end in front of the bar's.
    assert len(re.findall(r"caption 0/61 \[", run.stderr)) == 1, run.stderr
    assert re.search(r"caption 61/61 \[#+\].*img/s.*ETA", run.stderr), run.stderr


def test_a_killed_rank_loses_only_its_batch_in_flight_and_a_rerun_with_more_ranks_finishes(images, reference,
                                                                                           tmp_path):
    out = tmp_path / "captions.jsonl"
    killed = torchrun(2, images, out, env={KILL_ENV: "3"}, standalone=True)  # whoever writes the 3rd batch dies
    assert killed.returncode != 0 and "Signal 9 (SIGKILL) received" in killed.stderr, killed.stderr
    assert not out.exists()
    parts = part_lines(out)
    written = [line for lines in parts.values() for line in lines]
    assert len(written) >= 12  # 3 batches of 4 (5 with the broken file) at least, in one part per rank that wrote
    assert set(written) <= set(reference) and len(set(written)) == len(written)  # whole records, each image once
    # The other rank was stopped by SIGTERM: rank 0 then released the lock itself; if rank 0 was the one killed, its
    # lock stays, and the rerun on this host clears it (its process is gone).
    lock_left = JobLock(out).path.exists()

    rerun = torchrun(3, images, out)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{61 - len(written)} images to caption over 3 process(es) ({len(written)} already done)" in rerun.stderr
    assert ("removed a stale lock" in rerun.stderr) == lock_left
    assert out.read_text().splitlines() == reference
    assert not parts_folder(out).exists() and not JobLock(out).path.exists()


def test_one_process_finishes_what_a_torchrun_job_left(images, reference, tmp_path, capsys):
    """A plain `cogvlm caption` on an --out with parts beside it counts and merges them. The parts here hold what
    kills leave: a torn last line, a line also in OUT (a kill between a merge and the removal of its parts), an error
    record that --retry-errors tries again; OUT also holds a record of an image that is not in this input."""
    out = tmp_path / "captions.jsonl"
    other = json.dumps({"image": "elsewhere/x.png", "caption": "a red square", "prompt": PROMPT, "model": str(TINY)})
    out.write_text("\n".join([other, *reference[:20]]) + "\n")
    folder = parts_folder(out)
    folder.mkdir()
    failed = json.dumps({"image": json.loads(reference[40])["image"], "error": "cannot read image: a network hiccup"})
    (folder / "part-20250101-000000-1-00000.jsonl").write_text("\n".join([*reference[18:40], failed]) + "\n")
    (folder / "part-20250101-000000-1-00001.jsonl").write_text("\n".join(reference[41:56]) + "\n" + reference[56][:30])
    assert main(["caption", str(images), "--model", str(TINY), "--out", str(out), "--retry-errors", *OPTIONS]) == 0
    assert out.read_text().splitlines() == [other, *reference]
    # To do: the retried error (40), the broken file's error (30, tried again and failing again), the torn line (56)
    # and the four images nobody had (57-60).
    assert "7 images to caption over 1 process(es) (54 already done)" in capsys.readouterr().err
    assert not folder.exists() and not JobLock(out).path.exists()


def test_the_lock_keeps_a_second_job_out(images, tmp_path):
    out = tmp_path / "captions.jsonl"
    lock = JobLock(out).path
    held = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "2025-01-01 00:00:00"}) + "\n"
    lock.write_text(held)  # a job of this test's own process, which is alive
    run = torchrun(2, images, out)
    assert run.returncode != 0
    errors = re.findall(r"cogvlm caption: error: (.*)$", run.stderr, re.M)  # (unanchored: the ranks share one stderr)
    assert errors == [f"{out} is being written by another caption job (host {socket.gethostname()}, pid "
                      f"{os.getpid()}, since 2025-01-01 00:00:00): wait for it to end; if that job is gone (killed, "
                      f"or its machine went down), remove {lock} and run again"], run.stderr  # rank 0's, once
    assert main(["caption", str(images), "--model", str(TINY), "--out", str(out), *OPTIONS]) == 1  # one process too
    assert lock.read_text() == held and not out.exists() and not parts_folder(out).exists()


def test_a_lock_of_a_process_gone_from_this_host_is_cleared_one_of_another_host_is_not(tmp_path):
    out = tmp_path / "captions.jsonl"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = JobLock(out).path
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "since": "then"}))
    said = []
    with JobLock(out, said.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(OSError, match=f"pid {os.getpid()}, since"):
            JobLock(out).__enter__()  # a second job, while the first holds it
    assert not lock.exists() and said and "removed a stale lock" in said[0]
    lock.write_text(json.dumps({"host": "node-that-is-not-this-one", "pid": gone.pid, "since": "then"}))
    with pytest.raises(OSError, match=f"host node-that-is-not-this-one, pid {gone.pid}.*remove {lock}"):
        JobLock(out).__enter__()
    assert lock.exists()


def test_each_rank_takes_its_own_gpu(monkeypatch):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "2")
    args = Namespace(device=None, device_map=None, max_memory=None)
    torchrun_device(args)
    assert args.device == "cuda:2" and chosen == [2]
    for given in ({"device": "cpu"}, {"device": "cuda:0"}, {"device_map": "auto"}):  # as the user says
        args = Namespace(**{"device": None, "device_map": None, "max_memory": None, **given})
        torchrun_device(args)
        assert args.device == given.get("device")
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(ValueError, match="LOCAL_RANK 4, but only 4 GPUs are visible: give --nproc-per-node 4 or less"):
        torchrun_device(Namespace(device=None, device_map=None, max_memory=None))
