"""Captioning JPEG files through the torchrun job, against the in-process figure on pre-decoded tensors (issues 15, 19).

    python bench/caption_dist_bench.py images DIR [--n 512] [--size 1024x768]     # JPEG files, as bench/bench.py
    python bench/caption_dist_bench.py reference DIR [--batch 32] [--new-tokens 64] [--json ref.json]
    torchrun --standalone --nproc-per-node G bench/caption_dist_bench.py job DIR --out OUT.jsonl [--json job.json]
    python bench/caption_dist_bench.py all DIR [--n 512] [--gpus 1] [--json all.json]          # issue 15, one command
    python bench/caption_dist_bench.py all DIR --n 1024 --gpus 1 2 4 --kill                  # issue 19, one command

`reference` decodes and preprocesses every image first (`build_batch`: the same tensors the job makes) and times only
the model on them: `stream_rows` per batch, as `chat_batch` runs it. `job` is `run_dist_caption_job` over the files:
decoding and resizing in worker threads, one `chat_batch` per batch, a part file per rank, the merge. Both report
images/s after the first batch (warm-up), and both use the same prompt, batch and new tokens; no row stops early
(eos_id=-1), so random weights cost the same as real ones. `all` makes the images if DIR has none, runs the reference,
the job on each number of GPUs (each rank on its own GPU), checks one line per image, and with `--kill` also runs the
largest job again with the rank that writes the middle batch SIGKILLed right after it, reruns it with one GPU fewer,
and checks that there is still exactly one line per image.

The model: random weights (`bench.random_weights`; bf16 on GPUs, fp32 on the CPU) of `--preset` (a preset name or a
checkpoint folder's config) with the real tokenizer of examples/tiny-shapes. A CPU smoke run of everything:
`python bench/caption_dist_bench.py all /tmp/jpegs --n 24 --gpus 1 2 --kill --batch 4 --new-tokens 8 --device cpu
--preset examples/tiny-shapes`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench import TOKENIZER, commit, write_jpegs  # noqa: E402
from bench.random_weights import random_model  # noqa: E402
from cogvlm.caption import find_images  # noqa: E402
from cogvlm.caption_dist import KILL_ENV, run_dist_caption_job  # noqa: E402
from cogvlm.chat import build_batch, stream_rows  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.image import load_image  # noqa: E402
from cogvlm.speed import compile_layers, compile_wanted  # noqa: E402
from cogvlm.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Describe this image."


def make_images(folder: Path, n: int, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_jpegs(folder, n, tuple(int(x) for x in size.split("x")))


def load(args):
    """This rank's model, on cuda:LOCAL_RANK (or --device): random weights of --preset, the real tokenizer."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(CogVLMConfig.load(args.preset), device=device, dtype=dtype)
    model.tokenizer = Tokenizer(TOKENIZER)
    return model


def generation(args) -> dict:
    return {"max_new_tokens": args.new_tokens, "eos_id": -1}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_reference(args) -> dict:
    """Images/s of the model alone on pre-decoded, preprocessed batches (after the first batch)."""
    model = load(args)
    if compile_wanted(model):  # as the job does (cogvlm.speed), so that both run the same kernels
        compile_layers(model)
    paths = find_images([args.dir])
    groups = [paths[i:i + args.batch] for i in range(0, len(paths), args.batch)]
    batches = [build_batch(model, [load_image(p) for p in group], [PROMPT] * len(group), template="chat")
               for group in groups]
    times = []
    for batch in batches:
        start = time.perf_counter()
        pieces: list[list[str]] = [[] for _ in range(batch["input_ids"].shape[0])]
        for row, piece in stream_rows(model, batch, **generation(args)):  # as chat_batch runs one batch
            pieces[row].append(piece)
        sync()
        times.append(time.perf_counter() - start)
    steady = (len(paths) - batches[0]["input_ids"].shape[0]) / sum(times[1:]) if len(times) > 1 else None
    return {"images": len(paths), "batch": args.batch, "new_tokens": args.new_tokens, "first_batch_s": times[0],
            "images_per_s": steady}


def run_job(args) -> dict | None:
    """The torchrun job over the files (every rank runs this); rank 0 returns the figures and checks the file."""
    result = run_dist_caption_job(lambda: load(args), [args.dir], args.out, prompt=PROMPT, template="chat",
                                  batch_size=args.batch, generation=generation(args), model_name="bench",
                                  progress=False, log=lambda m: print(m, file=sys.stderr, flush=True))
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    lines = [json.loads(line)["image"] for line in Path(args.out).read_text().splitlines()]
    expected = find_images([args.dir])
    return {"ranks": int(os.environ.get("WORLD_SIZE", 1)), "images": result.images, "batch": args.batch,
            "new_tokens": args.new_tokens, "first_batch_s": result.first_batch_seconds, "seconds": result.seconds,
            "images_per_s": result.steady_images_per_s, "one_line_per_image": lines == expected}


def torchrun(args, gpus: int, out: Path, env: dict | None = None) -> tuple[int, dict | None]:
    """Run `job` under torchrun with `gpus` processes; (exit status, rank 0's figures)."""
    figures = out.with_suffix(".figures.json")
    figures.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               str(Path(__file__).resolve()), "job", str(args.dir), "--out", str(out), "--json", str(figures),
               "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--preset", args.preset]
    command += [f"--device={args.device}"] if args.device else []
    print("$", " ".join(command), file=sys.stderr, flush=True)
    status = subprocess.run(command, env={**os.environ, **(env or {})}).returncode
    return status, json.loads(figures.read_text()) if figures.exists() else None


def run_all(args) -> dict:
    if not (args.dir.is_dir() and any(args.dir.iterdir())):
        make_images(args.dir, args.n, args.size)
    work = Path(args.work or args.dir.parent / "caption_dist_bench")
    work.mkdir(parents=True, exist_ok=True)
    report = {"reference": run_reference(args), "jobs": []}
    ref = report["reference"]["images_per_s"]
    for gpus in args.gpus:
        out = work / f"captions-{gpus}.jsonl"
        out.unlink(missing_ok=True)
        status, figures = torchrun(args, gpus, out)
        figures = {**(figures or {}), "status": status}
        if figures.get("images_per_s") and ref:
            figures["per_gpu_vs_reference"] = figures["images_per_s"] / gpus / ref
        report["jobs"].append(figures)
    if args.kill and max(args.gpus) > 1:
        gpus, out = max(args.gpus), work / "captions-killed.jsonl"
        out.unlink(missing_ok=True)
        middle = len(find_images([args.dir])) // args.batch // 2
        killed, _ = torchrun(args, gpus, out, env={KILL_ENV: str(middle)})  # the rank writing that batch dies
        status, figures = torchrun(args, gpus - 1, out)
        report["kill"] = {"gpus": gpus, "killed_status": killed, "rerun_gpus": gpus - 1, "rerun_status": status,
                          "one_line_per_image": bool(figures and figures["one_line_per_image"])}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("images", "reference", "job", "all"))
    ap.add_argument("dir", type=Path, help="the folder of JPEG files")
    ap.add_argument("--n", type=int, default=512, help="images to make (images, all)")
    ap.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the images made")
    ap.add_argument("--out", help="the job's JSONL file (job)")
    ap.add_argument("--work", help="where `all` puts its JSONL files (default: beside DIR)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1], help="numbers of processes for `all`")
    ap.add_argument("--kill", action="store_true", help="`all`: also kill a rank mid-run and rerun")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--preset", default="cogvlm-chat-hf", help="preset name or checkpoint folder (its config)")
    ap.add_argument("--device", help="default: cuda:LOCAL_RANK, else cpu")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.what == "images":
        return make_images(args.dir, args.n, args.size)
    r = {"reference": run_reference, "job": run_job, "all": run_all}[args.what](args)
    if r is None:
        return
    r.update(date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv),
             card=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
             commit=commit(ROOT))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
