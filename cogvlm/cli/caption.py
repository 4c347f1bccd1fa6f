"""`cogvlm caption PATH... --out FILE.jsonl`: argument parsing only; the job is `cogvlm.caption`."""
from __future__ import annotations

import argparse
import sys
import time

from .options import (DEVICE_MAP_EXAMPLE, generation_kwargs, generation_options, load_model, log, model_options,
                      positive_int, text)

EXAMPLES = f"""examples:
  cogvlm caption ./images --out captions.jsonl
  cogvlm caption a.jpg ./more-images --out captions.jsonl --batch-size 16 --max-new-tokens 128
  cogvlm caption ./images --out captions.jsonl --prompt "Describe this image in detail."
  cogvlm caption ./images --out captions.jsonl --retry-errors    # try the unreadable files again
  cogvlm caption ./images --out captions.jsonl --device-map {DEVICE_MAP_EXAMPLE}

Folders are searched recursively for *.jpg *.jpeg *.png *.webp *.bmp *.gif *.tif *.tiff (any case), in sorted order.
Each image gets one JSON line: {{"image", "caption", "prompt", "model"}}, or {{"image", "error"}} when it cannot be
read (also reported on stderr; the run goes on). A rerun with the same --out skips the images already in it, so a
killed run is simply started again. Default prompt: "Describe this image." for the chat and vqa templates, and
"A picture of" for base (whose caption continues it).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("caption", parents=[model_options(), generation_options()], epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="caption image files and folders into a JSONL file (resumable)",
                              description="Caption every image under PATHS into a JSONL file, in batches; resumable.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file; a rerun skips what it holds")
    p.add_argument("--prompt", type=text, help="the question asked about every image (default: per template, see below)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default 8)")
    p.add_argument("--retry-errors", action="store_true",
                   help="try images with an error record again (their old record is removed)")
    return p


def run(args) -> None:
    from ..caption import CaptionFile, Progress, caption_images, default_prompt, find_images, speed

    images = find_images(args.paths, warn=lambda m: print(f"cogvlm caption: {m}", file=sys.stderr))
    if not images:
        raise ValueError(f"no image files ({', '.join(args.paths)}) found: looked for .jpg .jpeg .png .webp .bmp "
                         ".gif .tif .tiff")
    with CaptionFile(args.out) as out:
        if out.dropped_tail:
            log(args, f"removed an unfinished last line ({out.dropped_tail} bytes) of {args.out}")
        if args.retry_errors:
            dropped = out.drop_errors(set(images))
            if dropped:
                log(args, f"trying {dropped} unreadable image(s) again")
        done = out.done()
        todo = [path for path in images if path not in done]
        skipped = len(images) - len(todo)
        if not todo:  # nothing to do: no need to load the model
            log(args, f"all {len(images)} images already have a record in {args.out}")
            return
        log(args, f"{len(todo)} images to caption" + (f" ({skipped} already in {args.out})" if skipped else ""))
        model = load_model(args)
        template = args.template or model.cfg.template_version
        prompt = args.prompt if args.prompt is not None else default_prompt(template)
        previous = {r.get("prompt") for r in out.records if "caption" in r} - {prompt}
        if previous:
            log(args, f"note: {args.out} also holds captions made with another prompt ({sorted(previous)[0]!r}); "
                      "they are kept")
        progress = Progress(len(todo), enabled=not args.quiet)
        start = time.monotonic()
        try:
            captioned, errors = caption_images(
                model, todo, out, prompt=prompt, template=template, batch_size=args.batch_size,
                generation=generation_kwargs(args), model_name=args.model, progress=progress,
                report_error=lambda message: progress.message(f"cogvlm caption: skipped: {message}"))
        finally:
            progress.close()
        seconds = time.monotonic() - start
        log(args, f"{captioned} captioned, {errors} unreadable, {skipped} already done; "
                  f"{speed((captioned + errors) / seconds)} -> {args.out}")
