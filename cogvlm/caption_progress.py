"""How a caption job reports itself: the tqdm progress bar (rate after the first batch, ETA) and the closing summary
line; shared by the one-process job (`cogvlm.caption`) and the torchrun job (`cogvlm.caption_dist`)."""
from __future__ import annotations

import sys
from typing import Callable


def speed(rate: float) -> str:
    """Images per second, or seconds per image when that reads better (big models, slow machines)."""
    return f"{rate:.2f} img/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/img"


def summary(r, out) -> str:
    """The closing line for a `cogvlm.caption.CaptionResult`."""
    rate = f"{speed(r.steady_images_per_s)} after the first batch" if r.steady_images_per_s else "one batch"
    first = f"{r.first_batch_seconds:.1f}" if r.first_batch_seconds is not None else "-"
    return (f"{r.captioned} captioned, {r.errors} unreadable, {r.skipped} already done in {_clock(r.seconds)}; "
            f"{rate} (first batch {first} s) -> {out}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """The progress bar on stderr (tqdm): redrawn in place on a terminal; into a file or pipe, a plain line every 30
    seconds instead, so logs stay readable. Its rate leaves the first batch out (warm-up, compilation)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.tqdm = tqdm
        self.bar = tqdm(total=total, desc="caption", disable=not enabled, file=sys.stderr if tty else _Lines(),
                        mininterval=0.1 if tty else 30.0, ascii=None if tty else ".#",
                        bar_format="{desc} {n_fmt}/{total_fmt} [{bar:24}]{postfix}")

    def show(self, finished: int, r) -> None:
        if r.steady_images_per_s:
            eta = _clock((self.bar.total - finished) / r.steady_images_per_s)
            state = f"{speed(r.steady_images_per_s)}, elapsed {_clock(r.seconds)}, ETA {eta}"
        else:
            state = f"first batch {r.first_batch_seconds:.1f} s (warm-up), elapsed {_clock(r.seconds)}, ETA ?"
        if r.errors:
            state += f", {r.errors} unreadable"
        self.bar.set_postfix_str(state, refresh=False)
        self.bar.update(finished - self.bar.n)

    def note(self, say: Callable[[str], None], text: str) -> None:
        """An informative line, shown only with the bar (not with --quiet)."""
        if not self.bar.disable:
            self.message(say, text)

    def message(self, warn: Callable[[str], None], text: str) -> None:
        with self.tqdm.external_write_mode(file=sys.stderr):  # the bar steps aside for the line, then comes back
            warn(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


class _Lines:
    """tqdm's output for a log: each refresh on a line of its own, where a terminal would redraw with \\r."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n").rstrip()
        if text:
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()
