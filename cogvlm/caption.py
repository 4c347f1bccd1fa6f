"""Captioning whole folders: the job behind `cogvlm caption PATHS --out captions.jsonl`.

The JSONL file is the job's only state, so a run can be killed at any moment and started again:

- One line per image: `{"image": path, "caption": ..., "prompt": ..., "model": ...}`, or `{"image": path, "error": ...}`
  for a file that cannot be read. `image` is the path as found (normalised), which is also the key a rerun skips by.
- Each line goes to the file in a single `write()` of the whole line (O_APPEND), and the file is fsync'ed after every
  batch: a kill loses at most the batch in flight and never leaves half a line behind. If a line is cut anyway (power
  loss, a full disk), the next run truncates that unfinished tail before appending.
- A rerun skips every image that already has a record. Error records are final unless `retry_errors`: then they are
  removed (the file is rewritten atomically) and those images are tried again, so each image keeps exactly one line.
- An exclusive lock on the file stops two runs from writing the same file at once.

Images are opened and decoded once, in the loader (`cogvlm.image.load_image`), before they go into a batch: a corrupt
file becomes an error record instead of failing a whole batch, and the decoded PIL image is what `chat_batch` gets.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, TextIO

from .image import ImageError, load_image

__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_PROMPTS", "default_prompt", "find_images", "CaptionFile", "Progress",
           "caption_images", "speed"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# The question asked when --prompt is not given, per template. chat and vqa wrap it as "Question: ... Answer:";
# "Describe this image." is the query of the model card's example. The base template sends the prompt as it is and
# the model continues it, so there it is the start of a caption (the record keeps the prompt, to join them).
DEFAULT_PROMPTS = {"chat": "Describe this image.", "vqa": "Describe this image.", "base": "A picture of"}


def default_prompt(template: str) -> str:
    return DEFAULT_PROMPTS[template]


def find_images(paths: Iterable[str], warn: Callable[[str], None] = print) -> list[str]:
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


class CaptionFile:
    """The output JSONL, opened for appending and locked; `records` holds what earlier runs wrote."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd = -1
        self.dropped_tail = 0  # bytes of an unfinished last line removed on opening
        self._open()
        self.lines = self._read()  # (raw line, record) of every complete line

    @property
    def records(self) -> list[dict]:
        return [record for _, record in self.lines]

    def _open(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(f"the folder of --out does not exist: {self.path.parent}")
        # O_APPEND: every write() lands at the end of the file, whole.
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): no lock, one run at a time is then up to the user
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise OSError(f"{self.path} is being written by another `cogvlm caption` run") from None

    def _read(self) -> list[tuple[bytes, dict]]:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # An unfinished last line: cut it away so that the next line starts on a line of its own.
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
            self.dropped_tail = len(data) - end
        lines = []
        for number, raw in enumerate(data[:end].splitlines(keepends=True), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ValueError(f"{self.path}, line {number}: not a caption record (a JSON object with an "
                                 "\"image\"); is --out the right file?")
            lines.append((raw, record))
        return lines

    def done(self, retry_errors: bool = False) -> set[str]:
        """Images that already have a record (error records count unless they are to be retried)."""
        return {r["image"] for r in self.records if not (retry_errors and "error" in r)}

    def drop_errors(self, images: set[str]) -> int:
        """Remove the error records of `images` (to caption them again). The file is rewritten to a temporary file
        and renamed over the old one, so a kill at any point leaves either the old or the new file, both whole."""
        keep = [(raw, r) for raw, r in self.lines if not ("error" in r and r["image"] in images)]
        dropped = len(self.lines) - len(keep)
        if not dropped:
            return 0
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.writelines(raw for raw, _ in keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.close()
        self._open()  # the lock belonged to the old file
        self.lines = keep
        return dropped

    def append(self, records: list[dict]) -> None:
        """Write `records`, one write() per line, then fsync: after this returns they survive a kill or a crash."""
        for record in records:
            # ensure_ascii=False keeps captions readable; json escapes newlines, so a record is always one line.
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            written = os.write(self.fd, line)
            if written != len(line):  # regular files only write short when the disk is full
                raise OSError(f"could not write to {self.path} (disk full?)")
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also releases the lock
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Progress:
    """A one-line progress bar on stderr: count, bar, images/s, ETA and errors.

    On a terminal it is redrawn in place (carriage return) at most 10 times a second; into a file or pipe it writes a
    plain line every 30 seconds instead, so logs stay readable. `message` prints a line without breaking the bar.
    """

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True, label: str = "caption"):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.1 if self.tty else 30.0
        self.start = self.last = time.monotonic()
        self.done = self.errors = 0
        self.shown = False  # a bar is on the current terminal line
        self.drawn = None  # (done, errors) last drawn, so that close() does not repeat a final line in a log

    def update(self, done: int, errors: int = 0, force: bool = False) -> None:
        self.done, self.errors = done, errors
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= self.interval):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self.drawn = (self.done, self.errors)
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        width = 24
        filled = width * self.done // self.total if self.total else width
        line = (f"{self.label} {self.done}/{self.total} [{'#' * filled}{'.' * (width - filled)}] "
                f"{speed(rate)}, elapsed {_clock(elapsed)}, ETA {eta}")
        if self.errors:
            line += f", {self.errors} unreadable"
        if self.tty:
            self.stream.write("\r\033[K" + line)  # \033[K clears what a longer previous line left behind
            self.shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        if self.shown:
            self._draw(time.monotonic())
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self.tty or self.drawn != (self.done, self.errors):
                self._draw(time.monotonic())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
        self.shown = False


def speed(rate: float) -> str:
    """Images per second, or seconds per image when that reads better (big models, slow machines)."""
    return f"{rate:.2f} img/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/img"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def caption_images(model, images: list[str], out: CaptionFile, *, prompt: str, template: str | None,
                   batch_size: int, generation: dict, model_name: str, progress: Progress,
                   report_error: Callable[[str], None]) -> tuple[int, int]:
    """Caption `images` into `out`, `batch_size` readable images per `chat_batch` call. Returns (captioned, errors).

    Unreadable files are reported through `report_error`, recorded with their error, and skipped. Records are written
    in the order of `images` (errors in their place among the captions), one fsync per batch.
    """
    captioned = errors = 0
    batch: list[tuple[str, object, str | None]] = []  # (path, PIL image or None, error or None)

    def run_batch() -> None:
        nonlocal captioned
        readable = [(path, image) for path, image, error in batch if error is None]
        captions = iter(model.chat_batch([image for _, image in readable], [prompt] * len(readable),
                                         template=template, batch_size=max(len(readable), 1), **generation)
                        if readable else [])
        out.append([{"image": path, "error": error} if error is not None else
                    {"image": path, "caption": next(captions), "prompt": prompt, "model": model_name}
                    for path, _, error in batch])
        captioned += len(readable)
        batch.clear()
        progress.update(captioned + errors, errors)

    for path in images:
        try:
            batch.append((path, load_image(path), None))
        except ImageError as e:  # every way a file can be broken is an ImageError; never fatal to the run
            errors += 1
            batch.append((path, None, str(e)))
            report_error(str(e))
        if sum(error is None for _, _, error in batch) == batch_size:
            run_batch()
    if batch:
        run_batch()
    return captioned, errors
