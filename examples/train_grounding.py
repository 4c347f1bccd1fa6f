"""Train the tiny grounding model of examples/tiny-ground on one GPU, in one command that ends in a time budget.

    python examples/train_grounding.py --out OUT                 # on the GPU machine, from the repository root
    python examples/train_grounding.py --out /tmp/smoke --seconds 200 --images 400 --batch-size 8 \\
        --workers 2 --procs 2 --eval-every 10                    # the same steps in miniature, on a CPU

1. Data: `python -m cogvlm.shapes --mix caption=2,ground=3,boxes=0.5 --questions random` in --procs processes at
   once (seeds 1000, 1001, ...; the evaluation's are 1234 and 4321, the validation set's 2), joined into one
   data.jsonl.
2. Start: the architecture of examples/tiny-ground/cogvlm_config.json with `cogvlm.finetune.build_model` (seed 0),
   except that the ViT's patch position embeddings start as a 2-D sine-cosine code of row and column (`sincos_2d`),
   so that a patch's place is readable from the first step (the decoder gives all patches one position).
3. Training: `python -m cogvlm.finetune --model START --preset full ... --max-minutes M --workers W`: M is the time
   left until --seconds minus --reserve (evaluation, export), and the trainer fits its step count to it. If it
   fails at once (no checkpoint) with data workers, it is tried again without them (all images then cached).
4. The model: RUN/final (fp16), or, if the training died after a checkpoint, that checkpoint over START; written to
   OUT/tiny-ground/ in safetensors shards of at most 12 MiB (what comes back from the GPU machine is at most 16 MiB
   a file), without tokenizer.model (examples/tiny-ground holds it).
5. Evaluation: `python -m cogvlm.shapes --evaluate` on that folder (fresh scenes and images) -> OUT/eval.json.

OUT/summary.json (the options, each stage's seconds, the model's source) is rewritten after every stage, and the model
is in OUT before the evaluation starts, so a failure or a kill late in the run still leaves them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # (run as a script from anywhere: cogvlm is the repository's own)

import torch  # noqa: E402

from cogvlm import CogVLM  # noqa: E402
from cogvlm.config import CONFIG_FILE  # noqa: E402
from cogvlm.finetune import build_model, list_checkpoints, save_model  # noqa: E402
from cogvlm.finetune.loader import PREFETCH_PER_WORKER  # noqa: E402
from cogvlm.shards import read_tensors  # noqa: E402

EXAMPLE = ROOT / "examples" / "tiny-ground"
MIX = "caption=2,ground=3,boxes=0.5"
TRAIN_SEED, VAL_SEED = 1000, 2  # shard k uses TRAIN_SEED + k; `cogvlm.shapes.evaluate` uses 1234 and 4321
SHARD_BYTES = 12 * 2**20


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim), row-major patches: half the channels code the row, half the column, as sin/cos of dim/4
    frequencies from pi/(2*grid) (nearly linear across the grid) to pi/2 per patch (at pi, sin would be 0 on every
    patch: a dead channel); each channel standardised."""
    pos = torch.arange(grid, dtype=torch.float64)
    freqs = math.pi * torch.logspace(-math.log2(2 * grid), -1, dim // 4, base=2, dtype=torch.float64)
    axis = torch.cat([torch.sin(pos[:, None] * freqs), torch.cos(pos[:, None] * freqs)], 1)  # (grid, dim/2)
    code = torch.cat([axis[:, None, :].expand(grid, grid, -1), axis[None, :, :].expand(grid, grid, -1)], -1)
    code = code.reshape(grid * grid, dim)
    return ((code - code.mean(0)) / code.std(0).clamp_min(1e-6)).float()


def make_start(config: Path, tokenizer: Path, out: Path, seed: int = 0) -> Path:
    """`build_model(config, seed)` with the ViT's patch positions set to `sincos_2d` (cls row as drawn), as a
    model folder (fp32)."""
    model = build_model(config, seed)
    pos = model.vision.patch_embed.pos_embed  # (1 + grid^2, D), cls first
    grid = math.isqrt(pos.shape[0] - 1)
    with torch.no_grad():
        pos[1:] = sincos_2d(grid, pos.shape[1])
    return save_model(model, out, tokenizer=tokenizer, dtype=torch.float32, force=True)


def model_from_checkpoint(ckpt: Path, start: Path, out: Path) -> Path:
    """A `--preset full` training checkpoint (every parameter) over the start folder, as a fp16 model folder."""
    model = CogVLM.from_pretrained(start, device="cpu", dtype=torch.float32)
    tensors = read_tensors(ckpt, "trainable")
    missing = sorted(set(model.state_dict()) - set(tensors))
    if missing:
        raise ValueError(f"{ckpt} lacks {len(missing)} tensors (e.g. {missing[0]}): not a --preset full checkpoint")
    model.load_state_dict(tensors, strict=False)
    return save_model(model, out, tokenizer=start / "tokenizer.model", dtype=torch.float16, force=True)


def reshard(folder: Path, out: Path, max_bytes: int = SHARD_BYTES) -> Path:
    """The model folder again, its fp16 weights in shards of at most `max_bytes` (the same values)."""
    hf_config = json.loads((folder / CONFIG_FILE).read_text()).get("hf_config")
    model = CogVLM.from_pretrained(folder, device="cpu", dtype=torch.float16)
    return save_model(model, out, folder / "tokenizer.model", torch.float16, hf_config, force=True,
                      max_shard_bytes=max_bytes)


def generate_data(folder: Path, images: int, procs: int, val_images: int) -> tuple[Path, Path]:
    """The training set in `procs` shards generated at once, joined into folder/train.jsonl; and the validation
    set. Image paths in train.jsonl are relative to `folder`."""
    per = math.ceil(images / procs)
    shapes = [sys.executable, "-m", "cogvlm.shapes", "--mix", MIX, "--questions", "random", "--force"]
    jobs = [subprocess.Popen(shapes + ["--out", str(folder / f"part-{k:02d}"), "--n", str(per),
                                       "--seed", str(TRAIN_SEED + k)], cwd=ROOT, env=_env()) for k in range(procs)]
    jobs.append(subprocess.Popen(shapes + ["--out", str(folder / "val"), "--n", str(val_images),
                                           "--seed", str(VAL_SEED)], cwd=ROOT, env=_env()))
    if any(job.wait() != 0 for job in jobs):
        raise RuntimeError("data generation failed (see the messages above)")
    train = folder / "train.jsonl"
    with open(train, "w") as f:
        for k in range(procs):
            prefix = f'{{"image": "part-{k:02d}/images/'
            for line in open(folder / f"part-{k:02d}" / "data.jsonl"):
                if not line.startswith('{"image": "images/'):
                    raise ValueError(f"unexpected record in part {k}: {line[:80]}")
                f.write(prefix + line[len('{"image": "images/'):])
    return train, folder / "val" / "data.jsonl"


def affordable_workers(workers: int, batch_size: int, image_size: int, shm: str = "/dev/shm") -> int:
    """At most `workers` data workers whose batches in flight fit in `shm`, through which torch passes them (a
    small /dev/shm, as in some containers, would kill the workers with a bus error)."""
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return 0
    in_flight = batch_size * 3 * image_size**2 * 4 * (PREFETCH_PER_WORKER + 2)  # fp32 pixels, + pinned copies
    return max(0, min(workers, free // in_flight))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train_grounding.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="where the model, eval.json, metrics.jsonl, summary.json go")
    p.add_argument("--work", default="/tmp/tiny-ground-work", help="data, start and run folders (replaced)")
    p.add_argument("--seconds", type=float, default=420, help="target wall time of the whole command (default 420)")
    p.add_argument("--reserve", type=float, default=70,
                   help="seconds kept after training: start-up, final evaluation, export, --evaluate (default 70)")
    p.add_argument("--hard-seconds", type=float, default=570,
                   help="no stage runs past this (the GPU machine's limit is 600; default 570)")
    p.add_argument("--images", type=int, default=200_000, help="training images (default 200000, ~1.55 records each)")
    p.add_argument("--val-images", type=int, default=60)
    p.add_argument("--procs", type=int, default=min(16, os.cpu_count() or 1), help="data generation processes")
    p.add_argument("--workers", type=int, default=max(0, (os.cpu_count() or 1) - 4), help="data loader workers")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    summary = {"options": vars(args), "seconds": {}, "torch": torch.__version__,
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

    def stage(name: str, since: float) -> float:
        summary["seconds"][name] = round(time.time() - since, 1)
        summary["seconds"]["total"] = round(time.time() - t0, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"[train_grounding] {name}: {summary['seconds'][name]} s (total {summary['seconds']['total']} s)",
              file=sys.stderr, flush=True)
        return time.time()

    t = time.time()
    train, val = generate_data(work / "data", args.images, args.procs, args.val_images)
    t = stage("data", t)
    start = make_start(EXAMPLE / CONFIG_FILE, EXAMPLE / "tokenizer.model", work / "start", args.seed)
    t = stage("start", t)

    image_size = json.loads((EXAMPLE / CONFIG_FILE).read_text())["vision"]["image_size"]
    workers = affordable_workers(args.workers, args.batch_size, image_size)
    summary["attempts"] = []
    for attempt in range(2):  # a second time without data workers, if they were what failed at once
        run = work / f"run{attempt or ''}"
        minutes = (args.seconds - args.reserve - (time.time() - t0)) / 60
        if minutes * 60 < 30:
            print(f"[train_grounding] only {minutes * 60:.0f} s left to train: no attempt", file=sys.stderr)
            break
        # Without workers the training process preprocesses every image itself: then it keeps them all in memory.
        cache_mb = 1024 if workers else args.images * 3 * image_size**2 * 4 * 1.1 / 2**20
        cmd = [sys.executable, "-m", "cogvlm.finetune", "--model", str(start), "--data", str(train),
               "--eval-data", str(val), "--out", str(run), "--preset", "full", "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--min-lr-ratio", "0.02",
               "--weight-decay", "0.05", "--max-minutes", f"{minutes:.3f}", "--workers", str(workers),
               "--image-cache-mb", f"{cache_mb:.0f}", "--eval-every", str(args.eval_every),
               "--eval-max-examples", "100", "--eval-batch-size", "100", "--max-new-tokens", "80",
               "--save-every", str(args.save_every), "--keep-checkpoints", "1", "--log-every", "100",
               "--seed", str(args.seed), "--export-dtype", "fp16"]
        record = {"command": " ".join(cmd)}
        summary["attempts"].append(record)
        print(f"[train_grounding] {record['command']}", file=sys.stderr, flush=True)
        try:
            timeout = max(30, args.hard_seconds - 60 - (time.time() - t0))
            record["returncode"] = subprocess.run(cmd, cwd=ROOT, env=_env(), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            record["returncode"] = "killed: past --hard-seconds"
        t = stage(f"train{attempt or ''}", t)
        if record["returncode"] == 0 or list_checkpoints(run) or not workers:
            break
        workers = 0

    final = run / "final"
    if (final / CONFIG_FILE).exists():
        summary["model_source"] = str(final)
    elif list_checkpoints(run):
        ckpt = list_checkpoints(run)[-1]
        final = model_from_checkpoint(ckpt, start, work / "from-checkpoint")
        summary["model_source"] = str(ckpt)
    else:
        stage("no model", t)
        return 1
    ship = reshard(final, work / "ship")
    (out / "tiny-ground").mkdir(exist_ok=True)
    for f in sorted(ship.iterdir()):
        if f.name != "tokenizer.model":
            shutil.copyfile(f, out / "tiny-ground" / f.name)
    if (run / "metrics.jsonl").exists():
        shutil.copyfile(run / "metrics.jsonl", out / "metrics.jsonl")
    t = stage("model", t)

    try:
        res = subprocess.run([sys.executable, "-m", "cogvlm.shapes", "--evaluate", str(ship)], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=max(10, args.hard_seconds - (time.time() - t0)))
        sys.stderr.write(res.stderr)
        result = json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        result = {"error": "cogvlm.shapes --evaluate ran past --hard-seconds"}
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    summary["eval"] = result
    stage("evaluate", t)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
