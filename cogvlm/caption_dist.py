"""Captioning on many GPUs and machines with torchrun: `torchrun --nproc-per-node G -m cogvlm caption PATHS --out OUT`.

Every process (rank) loads its own model (on cuda:LOCAL_RANK, or as --device / --device-map say) and captions with the
one job loop of `cogvlm.caption` (decoding and resizing in worker threads, one `chat_batch` per batch, fsync per
batch). This module adds the sharing out and the putting together; see docs/caption_dist.md.

- Rank 0 takes the job's lock (`OUT.lock`), reads what earlier runs left (`OUT` and the parts in `OUT.parts/`), and
  cuts the images still to do into chunks of one batch, which it puts into torchrun's key-value store.
- A rank takes the next chunk with an atomic counter in that store (`store.add`, one round trip) whenever its decoding
  workers need more images, so a slow rank simply takes fewer chunks: no rank waits for another until the end, and no
  chunk is handed out twice. Progress counts go through the store the same way, for rank 0's one progress bar.
- Each rank appends its records to its own part `OUT.parts/part-RUN-RANK.jsonl` (a `CaptionFile`: one write per line,
  fsync per batch). The records are the only state: a rerun, with any number of ranks or nodes, counts every record in
  OUT and in every part as done, so a SIGKILLed rank loses at most its batch in flight (and the chunk it prefetched).
- When every rank is done, rank 0 merges OUT and the parts into OUT, one line per image in the input's order (records
  of other images that OUT held come first), through a temporary file that is fsync'ed and renamed over OUT; then the
  parts are removed. A kill before the rename leaves the old OUT and the parts (the next run merges them); a kill after
  it leaves parts that repeat lines of OUT, and the next merge keeps one line per image.

No process group is made: the job exchanges no tensors, only the plan and counters, which the store carries (as JSON,
nothing unpickled). So there is no collective that could make ranks wait for each other, and no NCCL memory on GPUs.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from .caption import (IMAGE_EXTENSIONS, CaptionFile, CaptionResult, ProgressBar, caption_batches, default_prompt,
                      find_images, summary)

__all__ = ["JobLock", "under_torchrun", "use_dist", "torchrun_device", "parts_folder", "run_dist_caption_job"]

KILL_ENV = "COGVLM_CAPTION_TEST_KILL"  # test hook, "N": the rank that writes the job's N-th batch SIGKILLs itself
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Other ranks wait this long for rank 0's plan (finding millions of files on a network file system takes minutes).
PLAN_TIMEOUT = timedelta(hours=2)
STORE_MESSAGE = 4 << 20  # bytes of chunk lists per store message (the store refuses messages over 8 MiB)


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARS)


def parts_folder(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def use_dist(out) -> bool:
    """Whether `cogvlm caption` runs this job: under torchrun, or (in one process) to finish what a torchrun job left
    beside OUT, so that its parts are counted and merged."""
    return under_torchrun() or parts_folder(out).is_dir()


def torchrun_device(args) -> None:
    """Each rank on its own GPU: --device becomes cuda:LOCAL_RANK, unless it names a device or cpu, or --device-map
    spreads the model (then every rank uses the map as given; see docs/caption_dist.md for one map per rank)."""
    if args.device not in (None, "cuda") or args.device_map or args.max_memory or not torch.cuda.is_available():
        return
    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if count > 1 and local >= count:
        raise ValueError(f"LOCAL_RANK {local}, but only {count} GPUs are visible: give --nproc-per-node {count} or "
                         "fewer")
    index = local if count > 1 else 0  # one GPU visible: this rank's own (CUDA_VISIBLE_DEVICES per rank) or shared
    torch.cuda.set_device(index)
    args.device = f"cuda:{index}"


class JobLock:
    """`OUT.lock`, created with O_EXCL and holding who runs the job (host, pid, start). Creating a file exclusively is
    atomic on local and network file systems alike, where flock is not always (NFS without a lock daemon, Lustre
    without -o flock). A lock left by a process that is gone from this host is cleared; one of another host is
    refused with the way out (remove the file), since its process cannot be checked from here."""

    def __init__(self, out, log: Callable[[str], None] | None = None):
        self.path = Path(out).with_name(Path(out).name + ".lock")
        self.log = log or (lambda message: None)
        self.mine = b""

    def __enter__(self):
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.mine = (json.dumps(owner) + "\n").encode()
        for attempt in (1, 2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                raise FileNotFoundError(f"the folder of --out does not exist: {self.path.parent}") from None
            except FileExistsError:
                held = self._read()
                if attempt == 1 and self._stale(held):
                    self.log(f"removed a stale lock {self.path} (its process is gone): {held.decode().strip()}")
                    self._remove(held)
                    continue
                raise OSError(self._refusal(held)) from None
            with os.fdopen(fd, "wb") as f:
                f.write(self.mine)
                f.flush()
                os.fsync(f.fileno())
            return self

    def __exit__(self, *exc):
        self._remove(self.mine)

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def _remove(self, content: bytes) -> None:
        """Remove the lock if it still holds `content` (never a lock someone else has taken meanwhile)."""
        if content and self._read() == content:
            self.path.unlink(missing_ok=True)

    @staticmethod
    def _owner(held: bytes) -> dict:
        try:
            owner = json.loads(held)
        except ValueError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def _stale(self, held: bytes) -> bool:
        owner = self._owner(held)
        if os.name != "posix" or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return False
        try:
            os.kill(owner["pid"], 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:  # it exists, as another user
            return False
        return False

    def _refusal(self, held: bytes) -> str:
        owner = self._owner(held)
        who = (f"host {owner.get('host')}, pid {owner.get('pid')}, since {owner.get('since')}" if owner
               else "its owner is not recorded")
        out = self.path.with_suffix("") if self.path.suffix == ".lock" else self.path
        return (f"{out} is being written by another caption job ({who}): wait for it to end; if that job is gone "
                f"(killed, or its machine went down), remove {self.path} and run again")


class Ranks:
    """This process's place in the job and torchrun's key-value store: the plan, the chunk counter, progress counts.
    Without torchrun (one process finishing a torchrun job's parts) the store is an in-process one."""

    def __init__(self):
        if under_torchrun():
            store, self.rank, self.world = next(dist.rendezvous("env://", timeout=PLAN_TIMEOUT))
            # With --max-restarts the same store may serve several attempts: keys are per attempt.
            attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
            self.store = dist.PrefixStore(f"cogvlm-caption/{attempt}/", store)
        else:
            self.rank, self.world, self.store = 0, 1, dist.HashStore()

    def add(self, key: str, n: int = 0) -> int:
        """Add n to the counter `key` atomically; its new value (n = 0: read it)."""
        return self.store.add(key, n)

    def publish(self, plan: dict, chunks: list[list[str]]) -> None:
        """Rank 0: the chunks first, then the plan that names them, so that a rank that sees the plan finds them."""
        keys, values, size = [], [], 0
        for k, chunk in enumerate(chunks):
            keys.append(f"chunk/{k}")
            values.append(json.dumps(chunk))
            size += len(values[-1])
            if size > STORE_MESSAGE or k == len(chunks) - 1:
                self.store.multi_set(keys, values)
                keys, values, size = [], [], 0
        self.store.set("plan", json.dumps(plan))

    def plan(self) -> dict:
        return json.loads(self.store.get("plan"))  # waits until rank 0 has set it

    def claimed(self, chunks: int) -> Iterator[str]:
        """The images of the chunks this rank takes, one chunk at a time, as its decoding workers ask for more."""
        while (k := self.add("next-chunk", 1) - 1) < chunks:
            yield from json.loads(self.store.get(f"chunk/{k}"))


def run_dist_caption_job(model, paths: Iterable[str], out: str | os.PathLike, *, prompt: str | None = None,
                         template: str | None = None, batch_size: int = 8, generation: dict | None = None,
                         model_name: str, retry_errors: bool = False, progress: bool = True,
                         log: Callable[[str], None] | None = None,
                         warn: Callable[[str], None] | None = None) -> CaptionResult:
    """`run_caption_job` over all ranks of a torchrun job (same arguments; `model` may be a loader, called by each rank
    only if there is something to caption). Rank 0 returns the whole job's result, the others their own share. If
    rank 0 refuses the job (a lock, a file that is not ours, another prompt), it raises the reason and the other ranks
    exit with status 1 without a message of their own."""
    say = log or (lambda message: None)
    warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
    ranks = Ranks()
    restore = _exit_on_sigterm()
    try:
        if ranks.rank != 0:
            return _follow(ranks, model, out, prompt, template, batch_size, generation or {}, model_name, warn, say)
        with JobLock(out, say):
            return _lead(ranks, model, paths, out, prompt, template, batch_size, generation or {}, model_name,
                         retry_errors, progress, warn, say)
    except BaseException as e:
        if ranks.rank == 0 and not _published(ranks):
            ranks.store.set("plan", json.dumps({"error": str(e)}))  # the others wait for a plan: tell them to stop
        raise
    finally:
        restore()


def _published(ranks: Ranks) -> bool:
    return ranks.store.check(["plan"])


def _exit_on_sigterm() -> Callable[[], None]:
    """torchrun stops the other ranks with SIGTERM when one fails: exit through the `finally` blocks then (the lock is
    released, files closed). Returns the function that puts the old handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _lead(ranks, model, paths, out, prompt, template, batch_size, generation, model_name, retry_errors, progress,
          warn, say) -> CaptionResult:
    """Rank 0: plan, caption its share, wait for the others, merge."""
    images = find_images(paths, warn=warn)
    if not images:
        raise ValueError(f"no image files found in {', '.join(map(str, paths))}: looked for "
                         f"{' '.join(IMAGE_EXTENSIONS)}")
    folder = parts_folder(out)
    with CaptionFile(out) as file:  # refuses a file that is not ours; kept open (and flock'ed) until the merge
        parts = _read_parts(folder)
        for f in (file, *parts):
            f.check_same("model", model_name, "--model")
            if prompt is not None:
                f.check_same("prompt", prompt, "--prompt")
        records = [r for f in (file, *parts) for r in f.records]
        done = {r["image"] for r in records if "caption" in r or not retry_errors}
        todo = [path for path in images if path not in done]
        job = CaptionResult(len(images), skipped=len(images) - len(todo))
        chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        plan = {"chunks": len(chunks), "run": f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                "prompt": next((r.get("prompt") for r in records if "caption" in r), None)}
        if todo:
            folder.mkdir(exist_ok=True)
            say(f"{len(todo)} images to caption over {ranks.world} process(es)"
                + (f" ({job.skipped} already done)" if job.skipped else ""))
        ranks.publish(plan, chunks)
        if todo:
            model, prompt, template = _ready(model, plan, out, prompt, template)
            with _JobBar(ranks, len(todo), progress) as bar:
                mine = _caption_share(ranks, model, plan, out, prompt, template, batch_size, generation, model_name,
                                      bar, warn)
                while ranks.add("finished") < ranks.world:  # the others' last batches; the bar goes on meanwhile
                    time.sleep(0.5)
                    bar.refresh()
                bar.refresh()
            job.seconds, job.first_batch_seconds = bar.job.seconds, bar.job.first_batch_seconds
            job.steady_images_per_s = bar.job.steady_images_per_s
            job.errors = ranks.add("errors")
            job.captioned = ranks.add("done") - job.errors
            say(f"rank 0: {summary(mine, 'its part')}")
            say("images per rank: " + ", ".join(f"{r}: {ranks.add(f'rank/{r}')}" for r in range(ranks.world)))
        elif not parts:
            say(f"all {len(images)} images already have a record in {out}")
            return job
        parts = _read_parts(folder)  # now with this run's
        missing = _merge(file, parts, images, folder)
    _remove_parts(folder, parts)
    if missing:
        raise OSError(f"{len(missing)} images have no record in {out} (the first: {missing[0]}); run again to caption "
                      "them")
    say(f"merged {len(parts)} part(s): {summary(job, out)}")
    return job


def _follow(ranks, model, out, prompt, template, batch_size, generation, model_name, warn, say) -> CaptionResult:
    """Any rank but 0: wait for the plan, caption chunks while there are any."""
    plan = ranks.plan()
    if "error" in plan:
        raise SystemExit(1)  # rank 0 says why
    if not plan["chunks"]:
        return CaptionResult(0)
    model, prompt, template = _ready(model, plan, out, prompt, template)
    with _JobBar(ranks, 0, False) as bar:
        mine = _caption_share(ranks, model, plan, out, prompt, template, batch_size, generation, model_name, bar,
                              warn)
    say(f"rank {ranks.rank}: {summary(mine, 'its part')}")
    return mine


def _caption_share(ranks, model, plan, out, prompt, template, batch_size, generation, model_name, bar,
                   warn) -> CaptionResult:
    """Caption the chunks this rank claims into its own part; tell the others when done."""
    result = CaptionResult(0)
    with CaptionFile(parts_folder(out) / f"part-{plan['run']}-{ranks.rank:05d}.jsonl") as part:
        caption_batches(model, ranks.claimed(plan["chunks"]), part, prompt, template, batch_size, generation,
                        model_name, result, bar, warn)
    result.images = result.captioned + result.errors
    ranks.add("finished", 1)
    return result


def _ready(model, plan, out, prompt, template):
    """The model loaded, the template and the prompt; the default prompt is only known now, as in run_caption_job."""
    if not hasattr(model, "chat_batch"):
        model = model()
    template = template or model.cfg.template_version
    prompt = prompt if prompt is not None else default_prompt(template)
    if plan["prompt"] not in (None, prompt):
        raise ValueError(f"{out} holds captions made with --prompt {plan['prompt']!r}, not {prompt!r}: give --prompt "
                         f"{plan['prompt']!r} to continue that file, or another --out for the new --prompt")
    return model, prompt, template


class _JobBar:
    """What `caption_batches` reports after each batch, for the whole job: each rank adds its counts to the store;
    rank 0 shows the totals on its one bar, with images/s after its first batch and the ETA."""

    def __init__(self, ranks: Ranks, total: int, enabled: bool):
        self.ranks = ranks
        self.bar = ProgressBar(total, enabled) if ranks.rank == 0 else None
        self.job = CaptionResult(total)  # whole-job numbers, as the bar shows them
        self.start = time.monotonic()
        self.first_done = 0
        self.sent = 0  # of this rank's finished images, already counted in the store
        self.sent_errors = 0
        self.kill_at = int(os.environ.get(KILL_ENV) or 0)

    def show(self, finished: int, result: CaptionResult) -> None:
        new, self.sent = finished - self.sent, finished
        self.ranks.add("done", new)
        self.ranks.add(f"rank/{self.ranks.rank}", new)
        self.ranks.add("errors", result.errors - self.sent_errors)
        self.sent_errors = result.errors
        if self.kill_at and self.ranks.add("batches", 1) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the test hook: a rank dies mid-job, its batches so far written
        self.refresh()

    def refresh(self) -> None:
        if self.bar is None:
            return
        job, done = self.job, self.ranks.add("done")
        job.errors = self.ranks.add("errors")
        job.seconds = time.monotonic() - self.start
        if job.first_batch_seconds is None:
            job.first_batch_seconds, self.first_done = job.seconds, done
        elif done > self.first_done:
            job.steady_images_per_s = (done - self.first_done) / (job.seconds - job.first_batch_seconds)
        self.bar.show(done, job)

    def message(self, warn: Callable[[str], None], text: str) -> None:
        if self.bar is not None:
            self.bar.message(warn, text)
        else:
            warn(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _read_parts(folder: Path) -> list[CaptionFile]:
    """Every part in `folder`, oldest run first, read and checked like OUT. A part's unfinished last line (a rank
    killed in the middle of a write) is cut away first: that image is simply done again."""
    parts = []
    for path in sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []:
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
        with CaptionFile(path) as part:  # closed at once (its lines stay read), so parts use no file descriptors
            parts.append(part)
    return parts


def _merge(file: CaptionFile, parts: list[CaptionFile], images: list[str], folder: Path) -> list[str]:
    """Write OUT with one line per image: the records of other images that OUT held, then `images` in their order.
    Of two records of one image (a retried error; a kill between an earlier merge and the removal of its parts) a
    caption beats an error, else the newer one wins. Returns the images that have no record."""
    best: dict[str, tuple[bytes, bool]] = {}  # image -> (line, is a caption), in the order first seen
    for raw, record in [*file.lines, *(line for part in parts for line in part.lines)]:  # oldest first
        kept = best.get(record["image"])
        if kept is None or "caption" in record or not kept[1]:
            best[record["image"]] = (raw, "caption" in record)
    wanted = set(images)
    lines = [raw for image, (raw, _) in best.items() if image not in wanted]
    lines += [best[image][0] for image in images if image in best]
    tmp = folder / f"merge.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file.path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(file.path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)
    return [image for image in images if image not in best]


def _remove_parts(folder: Path, parts: list[CaptionFile]) -> None:
    for part in parts:
        part.path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # not empty: something that is not ours, left as it is
        pass
