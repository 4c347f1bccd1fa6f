"""Captioning on many GPUs and machines with torchrun: `torchrun --nproc-per-node G -m cogvlm caption PATHS --out OUT`.

Each rank loads its own model (cuda:LOCAL_RANK, or as --device / --device-map say) and runs the one batch loop of
`cogvlm.caption` (decoding in worker threads, one `chat_batch` per batch); this module shares out and puts together
(docs/caption_dist.md). Rank 0 takes `OUT.lock`, counts the records in OUT and in the parts earlier runs left in
`OUT.parts/` as done, and puts the rest into torchrun's key-value store in chunks of one batch (64 images for
`--batch-size auto`). A rank takes the next chunk by an atomic counter there (`store.add`) when its decoding workers
need more images: a slow rank takes fewer; no chunk is handed out twice. Each rank appends to its own part (a
`CaptionFile`: one write per line, fsync per batch), so a SIGKILLed rank loses only its batch in flight, and a rerun
with any number of ranks or nodes goes on from the records. At the end rank 0 merges OUT and the parts into OUT, one
line per image in the input's order, through a temporary file renamed over OUT, then removes the parts.

No process group is made: the store carries a plan and counters (JSON, nothing unpickled), no tensors, so no collective
makes ranks wait for each other and GPUs hold no NCCL buffers.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from .batching import AUTO, MAX_BATCH
from .caption import (IMAGE_EXTENSIONS, CaptionFile, CaptionResult, ProgressBar, caption_batches, default_prompt,
                      find_images, summary)

__all__ = ["JobLock", "under_torchrun", "use_dist", "torchrun_device", "parts_folder", "run_dist_caption_job"]

KILL_ENV = "COGVLM_CAPTION_TEST_KILL"  # test hook, "N": the rank that writes the job's N-th batch SIGKILLs itself
PLAN_TIMEOUT = timedelta(hours=2)  # how long ranks wait for rank 0's plan (listing millions of files takes minutes)
STORE_MESSAGE = 4 << 20  # bytes of chunk lists per store message (the store refuses messages over 8 MiB)


def under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def parts_folder(out) -> Path:  # where the ranks' part files go
    return Path(out).with_name(Path(out).name + ".parts")


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
        raise ValueError(f"LOCAL_RANK {local}, but only {count} GPUs are visible: give --nproc-per-node {count} or less")
    index = local if count > 1 else 0  # one GPU visible: this rank's own (CUDA_VISIBLE_DEVICES per rank) or shared
    torch.cuda.set_device(index)
    args.device = f"cuda:{index}"


class JobLock:
    """`OUT.lock`, created with O_EXCL and holding who runs the job (host, pid, start). Creating a file exclusively is
    atomic on local and network file systems alike, where flock is not always (NFS without a lock daemon, Lustre
    without -o flock). A lock left by a process that is gone from this host is cleared; one of another host is
    refused with the way out (remove the file), since its process cannot be checked from here."""

    def __init__(self, out, log: Callable[[str], None] | None = None):
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + ".lock")
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

    def _stale(self, held: bytes) -> bool:
        owner = _owner(held)
        if os.name != "posix" or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return False
        try:
            os.kill(owner["pid"], 0)  # signal 0 only asks whether the process exists (PermissionError: it does)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def _refusal(self, held: bytes) -> str:
        owner = _owner(held)
        who = (f"host {owner.get('host')}, pid {owner.get('pid')}, since {owner.get('since')}" if owner
               else "its owner is not recorded")
        return (f"{self.out} is being written by another caption job ({who}): wait for it to end; if that job is gone "
                f"(killed, or its machine went down), remove {self.path} and run again")


def _owner(held: bytes) -> dict:
    try:
        owner = json.loads(held)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


class Ranks:
    """This process's place in the job and torchrun's key-value store: the plan, the chunk counter, progress counts.
    Without torchrun (one process finishing a torchrun job's parts) the store is an in-process one."""

    def __init__(self):
        if under_torchrun():
            store, self.rank, self.world = next(dist.rendezvous("env://", timeout=PLAN_TIMEOUT))
            attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
            self.store = dist.PrefixStore(f"cogvlm-caption/{attempt}/", store)  # per attempt (--max-restarts)
        else:
            self.rank, self.world, self.store = 0, 1, dist.HashStore()

    def add(self, key: str, n: int = 0) -> int:
        """Add n to the counter `key` atomically; its new value (n = 0: read it)."""
        return self.store.add(key, n)

    def publish(self, plan: dict, chunks: list[list[str]]) -> None:
        """Rank 0: the chunks first, then the plan that names them, so that a rank that sees the plan finds them."""
        group, size = {}, 0
        for k, chunk in enumerate(chunks):
            group[f"chunk/{k}"] = value = json.dumps(chunk)
            size += len(value)
            if size > STORE_MESSAGE or k == len(chunks) - 1:
                self.store.multi_set(list(group), list(group.values()))
                group, size = {}, 0
        self.store.set("plan", json.dumps(plan))

    def plan(self) -> dict:
        return json.loads(self.store.get("plan"))  # waits until rank 0 has set it

    def claimed(self, chunks: int) -> Iterator[str]:
        """The images of the chunks this rank takes, one chunk at a time, as its decoding workers ask for more."""
        while (k := self.add("next-chunk", 1) - 1) < chunks:
            yield from json.loads(self.store.get(f"chunk/{k}"))


def run_dist_caption_job(model, paths: Iterable[str], out: str | os.PathLike, *, prompt: str | None = None,
                         template: str | None = None, batch_size: int | str = 8, generation: dict | None = None,
                         model_name: str, retry_errors: bool = False, progress: bool = True, boxes: bool = False,
                         log: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None):
    """`run_caption_job` over all ranks of a torchrun job (same arguments; `model` may be a loader, called by each rank
    only if there is something to caption). Rank 0 returns the whole job's result, the others their own share. If
    rank 0 refuses the job (a lock, a file that is not ours, another prompt), it raises the reason and the other ranks
    exit with status 1 without a message of their own."""
    job = _Job(Ranks(), model, Path(out), prompt, template, batch_size, generation or {}, model_name, boxes,
               warn or (lambda message: print(message, file=sys.stderr, flush=True)), log or (lambda message: None))
    restore = _exit_on_sigterm()
    try:
        if job.ranks.rank != 0:
            return job.follow()
        with JobLock(out, job.say):
            return job.lead(paths, retry_errors, progress)
    except BaseException as e:
        if job.ranks.rank == 0 and not job.ranks.store.check(["plan"]):
            job.ranks.store.set("plan", json.dumps({"error": str(e)}))  # the others wait for a plan: tell them to stop
        raise
    finally:
        restore()


def _exit_on_sigterm() -> Callable[[], None]:
    """torchrun stops the other ranks with SIGTERM when one fails: exit through the `finally` blocks then (the lock is
    released, files closed). Returns the function that puts the old handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


@dataclass
class _Job:
    ranks: Ranks
    model: object  # or its loader, until `ready`
    out: Path
    prompt: str | None
    template: str | None
    batch_size: int | str
    generation: dict
    model_name: str
    boxes: bool
    warn: Callable[[str], None]
    say: Callable[[str], None]

    def lead(self, paths, retry_errors: bool, progress: bool) -> CaptionResult:
        """Rank 0: plan, caption its share, wait for the others, merge."""
        images = find_images(paths, warn=self.warn)
        if not images:
            raise ValueError(f"no image files found in {', '.join(map(str, paths))}: looked for "
                             f"{' '.join(IMAGE_EXTENSIONS)}")
        ranks, folder = self.ranks, parts_folder(self.out)
        with CaptionFile(self.out) as file:  # refuses a file that is not ours; kept open (and flock'ed) until merged
            parts = _read_parts(folder)
            for f in (file, *parts):
                f.check_same("model", self.model_name, "--model")
                if self.prompt is not None:
                    f.check_same("prompt", self.prompt, "--prompt")
            records = [r for f in (file, *parts) for r in f.records]
            done = {r["image"] for r in records if "caption" in r or not retry_errors}
            todo = [path for path in images if path not in done]
            result = CaptionResult(len(images), skipped=len(images) - len(todo))
            size = MAX_BATCH if self.batch_size == AUTO else self.batch_size  # (auto: each rank picks its batch)
            chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
            plan = {"chunks": len(chunks), "run": f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                    "prompt": next((r.get("prompt") for r in records if "caption" in r), None)}
            if todo:
                folder.mkdir(exist_ok=True)
                self.say(f"{len(todo)} images to caption over {ranks.world} process(es)"
                         + (f" ({result.skipped} already done)" if result.skipped else ""))
            ranks.publish(plan, chunks)
            if todo:
                self.ready(plan)
                with _JobBar(ranks, len(todo), progress) as bar:
                    self.share(plan, bar)
                    while ranks.add("finished") < ranks.world:  # the others' last batches; the bar goes on
                        time.sleep(0.5)
                        bar.refresh()
                    bar.refresh()
                result.seconds, result.first_batch_seconds = bar.job.seconds, bar.job.first_batch_seconds
                result.steady_images_per_s, result.errors = bar.job.steady_images_per_s, ranks.add("errors")
                result.captioned = ranks.add("done") - result.errors
                self.say("images per rank: " + ", ".join(f"{r}: {ranks.add(f'rank/{r}')}" for r in range(ranks.world)))
            elif not parts:
                self.say(f"all {len(images)} images already have a record in {self.out}")
                return result
            parts = _read_parts(folder)  # now with this run's
            missing = _merge(file, parts, images, folder)
        for part in parts:
            part.path.unlink(missing_ok=True)
        with suppress(OSError):  # not empty: what is not ours stays
            folder.rmdir()
        if missing:
            raise OSError(f"{len(missing)} images have no record in {self.out} (the first: {missing[0]}); run again "
                          "to caption them")
        self.say(f"merged {len(parts)} part(s): {summary(result, self.out)}")
        return result

    def follow(self) -> CaptionResult:
        """Any rank but 0: wait for the plan, caption chunks while there are any."""
        plan = self.ranks.plan()
        if "error" in plan:
            raise SystemExit(1)  # rank 0 says why
        if not plan["chunks"]:
            return CaptionResult(0)
        self.ready(plan)
        with _JobBar(self.ranks, 0, False) as bar:
            return self.share(plan, bar)

    def ready(self, plan: dict) -> None:
        """The model loaded, the template and prompt known (the default prompt only now, as in run_caption_job)."""
        if not hasattr(self.model, "chat_batch"):
            self.model = self.model()
        self.template = self.template or self.model.cfg.template_version
        self.prompt = self.prompt if self.prompt is not None else default_prompt(self.template)
        if plan["prompt"] not in (None, self.prompt):
            raise ValueError(f"{self.out} holds captions made with --prompt {plan['prompt']!r}, not {self.prompt!r}: "
                             f"give --prompt {plan['prompt']!r} to continue that file, or another --out for the new "
                             "--prompt")

    def share(self, plan: dict, bar: _JobBar) -> CaptionResult:
        """Caption the chunks this rank claims into its own part; tell the others when done."""
        mine = CaptionResult(0)
        with CaptionFile(parts_folder(self.out) / f"part-{plan['run']}-{self.ranks.rank:05d}.jsonl") as part:
            caption_batches(self.model, self.ranks.claimed(plan["chunks"]), part, self.prompt, self.template,
                            self.batch_size, self.generation, self.model_name, mine, bar, self.warn, self.boxes)
        mine.images = mine.captioned + mine.errors
        self.ranks.add("finished", 1)
        self.say(f"rank {self.ranks.rank}: {summary(mine, 'its part')}")
        return mine


class _JobBar(ProgressBar):
    """What `caption_batches` reports after each batch, for the whole job: each rank adds its counts to the store;
    rank 0 shows the totals on its one bar, with images/s after its first batch and the ETA."""

    def __init__(self, ranks: Ranks, total: int, enabled: bool):
        super().__init__(total, enabled and ranks.rank == 0)
        self.ranks, self.job = ranks, CaptionResult(total)  # whole-job numbers, as the bar shows them
        self.start, self.first_done = time.monotonic(), 0
        self.sent = self.sent_errors = 0  # this rank's finished images and errors already counted in the store
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
        if self.ranks.rank != 0:
            return
        job, done = self.job, self.ranks.add("done")
        job.errors = self.ranks.add("errors")
        job.seconds = time.monotonic() - self.start
        if job.first_batch_seconds is None:
            job.first_batch_seconds, self.first_done = job.seconds, done
        elif done > self.first_done:
            job.steady_images_per_s = (done - self.first_done) / (job.seconds - job.first_batch_seconds)
        super().show(done, job)


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
    _fsync_folder(file.path.parent)  # the rename itself survives a crash
    return [image for image in images if image not in best]


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

