"""Captioning many images into a JSONL file: `run_caption_job`, the one captioning path of `cogvlm caption`, of
`bench/bench.py` and of anything that captions at scale.

The JSONL file is the job's only state, so a run can be killed at any moment and started again:

- One line per image: `{"image": path, "caption": ..., "prompt": ..., "model": ...}`, or `{"image": path, "error": ...}`
  for a file that cannot be read. `image` is the path as found (normalised), which is also the key a rerun skips by.
  A path that is not valid UTF-8 (a file name in another encoding) is written with JSON escapes `\\udcXX` for its odd
  bytes, which Python's json reads back as the same path (os functions take it, as `surrogateescape`).
- Each line goes to the file in a single `write()` of the whole line (O_APPEND), and the file is fsync'ed after every
  batch: a kill loses at most the batch in flight and never leaves half a line behind. A write that fails (a full
  disk, an I/O error) is cut back to the last whole line and ends the run; everything written before stays.
- The file is never changed unless it is ours: one that does not end with a line break, or holds a line that is not a
  caption record, is refused before anything is written. It is created only when the first record is written, so a
  run that fails earlier (say, while loading the model) leaves no empty file behind.
- A rerun skips every image that already has a record; it must ask the same prompt of the same model (otherwise the
  file would mix two jobs), else it is refused with the way out. Error records are final unless `retry_errors`: then
  they are removed (the file is rewritten atomically) and those images are tried again, so each image keeps one line.
- Locks stop two runs from writing one file at once: `OUT.lock` (see `cogvlm.caption_dist`) and a flock on the file.

Each image is decoded once (upright by its EXIF orientation, RGB) and preprocessed in a worker thread a batch ahead of
the model; the batches go to `model.chat_batch`. A corrupt file becomes an error record, not a failed batch.
"""
from __future__ import annotations

import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from time import monotonic
from typing import Callable, Iterable, Iterator

from .batching import AUTO, auto_batch_size
from .caption_progress import ProgressBar, summary
from .grounding import boxes_record
from .image import ImageError, load_image, preprocess
from .speed import compile_layers, compile_wanted

__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_PROMPTS", "default_prompt", "find_images", "CaptionFile", "CaptionResult",
           "run_caption_job", "caption_batches", "ProgressBar"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# The question asked when no prompt is given, per template. chat and vqa wrap it as "Question: ... Answer:";
# "Describe this image." is the query of the model card's example. The base template sends the prompt as it is and
# the model continues it, so there it is the start of a caption (the record keeps the prompt, to join them).
DEFAULT_PROMPTS = {"chat": "Describe this image.", "vqa": "Describe this image.", "base": "A picture of"}


def default_prompt(template: str) -> str:
    return DEFAULT_PROMPTS[template]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_images(paths: Iterable[str], warn: Callable[[str], None] = _stderr) -> list[str]:
    """Image files under `paths`, in a fixed order: each folder's files (by extension, case-insensitive, recursively)
    sorted by path, the arguments in the order given, each file once. A file named explicitly is taken whatever its
    extension (if it is no image, it gets an error record). A path that does not exist is an error."""
    found: dict[str, None] = {}  # an ordered set
    for arg in paths:
        arg = os.fspath(arg)
        if os.path.isdir(arg):
            names = []
            # os.walk does not follow symlinked folders, so a link cycle cannot make this loop forever.
            for root, _, files in os.walk(arg, onerror=lambda e: warn(f"skipping unreadable folder: {e}")):
                names += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            names.sort()
        elif os.path.exists(arg):
            names = [arg]
        else:
            raise FileNotFoundError(f"no such file or folder: {arg}")
        found.update((os.path.normpath(n), None) for n in names)
    return list(found)


def _line(record: dict) -> bytes:
    """One record as one line. ensure_ascii=False keeps captions readable; a path with bytes that are not UTF-8
    (lone surrogates) cannot be UTF-8 encoded, so that record is written all-ASCII, with escapes, instead. json
    escapes newlines, so a record is always one line."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode("ascii")


class CaptionFile:
    """The output JSONL: `records` holds what earlier runs wrote; `append` adds a batch of records."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd = -1
        self.lines: list[tuple[bytes, dict]] = []  # (raw line, record) of every line
        folder = self.path.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"the folder of --out {self.path} does not exist: {folder}")
        if self.path.exists():
            if not self.path.is_file():
                raise ValueError(f"--out {self.path} is not a regular file; give a path for a .jsonl file")
            self._open(os.O_RDWR | os.O_APPEND)
            self.lines = self._read()
        elif not os.access(folder, os.W_OK):
            raise PermissionError(f"cannot create --out {self.path}: the folder {folder} is not writable")

    @property
    def records(self) -> list[dict]:
        return [record for _, record in self.lines]

    def _open(self, flags: int) -> None:
        # O_APPEND: every write() lands at the end of the file, whole.
        self.fd = os.open(self.path, flags, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise OSError(f"{self.path} is being written by another `cogvlm caption` run") from None
        except (ImportError, OSError):  # no flock here (Windows, NFS without lockd, Lustre): OUT.lock still holds
            pass

    def _read(self) -> list[tuple[bytes, dict]]:
        """Every record of the file, which is only read here: anything that is not ours is refused unchanged."""
        data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        if data and not data.endswith(b"\n"):
            raise ValueError(
                f"{self.path} does not end with a line break: its last line is unfinished (a run cut short by a "
                "crash or a full disk?) or it is not a caption file; nothing was changed. Remove or finish that "
                "last line, or give another --out")
        lines = []
        for number, raw in enumerate(data.splitlines(keepends=True), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # not JSON, or not UTF-8
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("image"), str)
                    and ("caption" in record or "error" in record)):
                raise ValueError(f"{self.path}, line {number}: not a caption record (a JSON object with \"image\" "
                                 "and \"caption\" or \"error\"); nothing was changed. Is --out the right file?")
            lines.append((raw, record))
        return lines

    def done(self) -> set[str]:
        """Images that already have a record."""
        return {r["image"] for r in self.records}

    def check_same(self, key: str, value: str, option: str) -> None:
        """Refuse to add captions whose `key` (prompt, model) differs from those already in the file."""
        old = next((r.get(key) for r in self.records if "caption" in r and r.get(key) != value), value)
        if old != value:
            raise ValueError(f"{self.path} holds captions made with {option} {old!r}, not {value!r}: give {option} "
                             f"{old!r} to continue that file, or another --out for the new {option}")

    def drop_errors(self, images: set[str]) -> int:
        """Remove the error records of `images` (to caption them again). The file is rewritten to a temporary file
        and renamed over the old one, so a kill at any point leaves either the old or the new file, both whole."""
        keep = [(raw, r) for raw, r in self.lines if not ("error" in r and r["image"] in images)]
        dropped = len(self.lines) - len(keep)
        if not dropped:
            return 0
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.writelines(raw for raw, _ in keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.close()
        self._open(os.O_RDWR | os.O_APPEND)  # the lock belonged to the old file
        self.lines = keep
        return dropped

    def append(self, records: list[dict]) -> None:
        """Write `records`, one write() per line, then fsync: after this returns they survive a kill or a crash.
        A failing write is cut back to the last whole line, and raised as an OSError that says what is kept."""
        if self.fd < 0:
            try:  # created now, at the first record; O_EXCL: a run that started meanwhile must not be overwritten
                self._open(os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                raise OSError(f"{self.path} was created by someone else while this run started; run again") from None
        for record in records:
            line = _line(record)
            size = os.fstat(self.fd).st_size
            try:
                if os.write(self.fd, line) != len(line):  # regular files only write short when the disk is full
                    raise OSError(28, "No space left on device (short write)")
            except OSError as e:
                self._cut(size)
                raise OSError(f"cannot write to {self.path}: {e.strerror or e}; the {len(self.lines)} records "
                              "written before are kept, rerun to go on") from None
            self.lines.append((line, record))
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise OSError(f"cannot write to {self.path}: {e.strerror or e}; rerun to go on") from None

    def _cut(self, size: int) -> None:
        """Remove what a failed write left after the last whole line (our own bytes)."""
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            pass  # the next run refuses the unfinished line and says so

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also releases the lock
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class CaptionResult:
    images: int  # found under the paths
    captioned: int = 0
    errors: int = 0  # unreadable images (error records written)
    skipped: int = 0  # already in the file
    seconds: float = 0.0  # from the first image decoded to the last record written (the model loaded before)
    first_batch_seconds: float | None = None  # warm-up included: allocations, compilation, graph capture
    steady_images_per_s: float | None = None  # images per second after the first batch (None: one batch only)
    batch_size: int | None = None  # as run (what --batch-size auto chose)


def run_caption_job(model, paths: Iterable[str], out: str | os.PathLike, *, prompt: str | None = None,
                    template: str | None = None, batch_size: int | str = 8, generation: dict | None = None,
                    model_name: str, retry_errors: bool = False, progress: bool = True,
                    log: Callable[[str], None] | None = None, warn: Callable[[str], None] = _stderr,
                    boxes: bool = False) -> CaptionResult:
    """Caption the images under `paths` into the JSONL file `out` (see the module docstring), resuming it.

    `model`: a loaded CogVLM, or a function that loads one, called only if there is something to caption (after the
    file was checked, so a refusal costs no loading time). `prompt`: default per template. `template`: default the
    model's. `generation`: keywords of `chat_batch` (max_new_tokens, do_sample, ...). `model_name` is what records
    say in "model". `log` gets progress messages (None: silent), `warn` every unreadable image and folder;
    `progress` shows a tqdm bar on stderr. `boxes`: each record also gets the boxes parsed from its caption.
    """
    images = find_images(paths, warn=warn)
    if not images:
        raise ValueError(f"no image files found in {', '.join(map(str, paths))}: looked for "
                         f"{' '.join(IMAGE_EXTENSIONS)}")
    say = log or (lambda message: None)
    with CaptionFile(out) as file:
        if retry_errors:
            dropped = file.drop_errors(set(images))
            if dropped:
                say(f"trying {dropped} unreadable image(s) again")
        file.check_same("model", model_name, "--model")
        if prompt is not None:  # (the default prompt is known once the model's template is)
            file.check_same("prompt", prompt, "--prompt")
        done = file.done()
        todo = [path for path in images if path not in done]
        result = CaptionResult(len(images), skipped=len(images) - len(todo))
        if not todo:  # nothing to do: no need to load the model
            say(f"all {len(images)} images already have a record in {out}")
            return result
        say(f"{len(todo)} images to caption" + (f" ({result.skipped} already in {out})" if result.skipped else ""))
        if not hasattr(model, "chat_batch"):
            model = model()
        template = template or model.cfg.template_version
        prompt = prompt if prompt is not None else default_prompt(template)
        file.check_same("prompt", prompt, "--prompt")
        with ProgressBar(len(todo), progress) as bar:
            caption_batches(model, todo, file, prompt, template, batch_size, generation or {}, model_name, result,
                            bar, warn, boxes)
        say(summary(result, out))
        return result


def caption_batches(model, todo: Iterable[str], file, prompt, template, batch_size, generation, model_name, result,
                    bar, warn, boxes: bool = False) -> None:
    """The batch loop, also of each torchrun rank (caption_dist.py): `todo` (read lazily) decoded a batch ahead, one
    `chat_batch` per batch, its records appended to `file`, then `bar.show`. `boxes`: each record also holds the
    boxes parsed from its caption (`cogvlm.grounding.boxes_record`, in the original image's pixels too)."""
    if compile_wanted(model):  # a long job on a GPU: compiled layers (cogvlm.speed; COGVLM_COMPILE=0 to stay eager)
        compile_layers(model)
    if batch_size == AUTO:  # the largest that the memory left after loading holds (cogvlm.batching)
        batch_size = auto_batch_size(model, prompt, template, generation.get("max_new_tokens"))
        bar.note(warn, f"batch size {batch_size} (--batch-size auto: from the memory free after loading)")
    result.batch_size = batch_size
    start = monotonic()
    first_done = 0  # images finished by the end of the first batch
    batch: list[tuple[str, tuple | None, str | None]] = []  # (path, (pixels, (width, height)) or None, error or None)

    def record(path: str, caption: str, size: tuple[int, int]) -> dict:
        r = {"image": path, "caption": caption, "prompt": prompt, "model": model_name}
        return {**r, **boxes_record(caption, size)} if boxes else r

    def run_batch() -> None:
        nonlocal first_done
        readable = [(path, image) for path, image, error in batch if error is None]
        captions = iter(model.chat_batch([pixels for _, (pixels, _) in readable], [prompt] * len(readable),
                                         template=template, batch_size=None, **generation)
                        if readable else [])
        file.append([{"image": path, "error": error} if error is not None else record(path, next(captions), image[1])
                     for path, image, error in batch])
        result.captioned += len(readable)
        batch.clear()
        now = monotonic()
        result.seconds = now - start
        finished = result.captioned + result.errors
        if result.first_batch_seconds is None:
            result.first_batch_seconds, first_done = result.seconds, finished
        elif finished > first_done:
            result.steady_images_per_s = (finished - first_done) / (result.seconds - result.first_batch_seconds)
        bar.show(finished, result)

    for path, image, error in _prefetch(partial(_decode, size=model.cfg.vision.image_size), todo, ahead=batch_size):
        if error is not None:  # every way a file can be broken is an ImageError; never fatal to the run
            result.errors += 1
            bar.message(warn, f"skipped: {error}")
        batch.append((path, image, error))
        if sum(e is None for _, _, e in batch) == batch_size:
            run_batch()
    if batch:
        run_batch()


def _decode(path: str, size: int) -> tuple[str, tuple | None, str | None]:
    try:  # decoded, resized and normalised off the model's thread (for a photo resizing costs as much as decoding)
        image = load_image(path)
        return path, (preprocess(image, size), image.size), None
    except ImageError as e:
        return path, None, str(e)


def _prefetch(fn, items: list, ahead: int) -> Iterator:
    """fn(item) for each item, in order, computed by up to four threads up to `ahead` items in advance (PIL and torch
    work without holding the GIL, so this overlaps with the model; at most `ahead` decoded images wait in memory)."""
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="cogvlm-decode") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
