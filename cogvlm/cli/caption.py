"""`cogvlm caption PATH... --out FILE.jsonl`: argument parsing only; the job is `cogvlm.caption`."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

from .options import (DEVICE_MAP_EXAMPLE, generation_kwargs, generation_options, import_model_code, load_model, log,
                      model_options, positive_int, text)

EXAMPLES = f"""examples:
  cogvlm caption ./images --out captions.jsonl
  cogvlm caption a.jpg ./more-images --out captions.jsonl --batch-size 16 --max-new-tokens 128
  cogvlm caption ./images --out captions.jsonl --prompt "Describe this image in detail."
  cogvlm caption ./images --out captions.jsonl --retry-errors    # try the unreadable files again
  cogvlm caption ./images --out boxes.jsonl --model THUDM/cogvlm-grounding-generalist-hf --boxes \\
      --prompt "Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] for each mentioned object?"
  cogvlm caption ./images --out captions.jsonl --device-map {DEVICE_MAP_EXAMPLE}
  torchrun --nproc-per-node 8 -m cogvlm caption ./images --out captions.jsonl   # one process per GPU

Folders are searched recursively for *.jpg *.jpeg *.png *.webp *.bmp *.gif *.tif *.tiff (any case), in sorted order;
photos are turned upright by their EXIF orientation. Each image gets one JSON line: {{"image", "caption", "prompt",
"model"}}, or {{"image", "error"}} when it cannot be read (also reported on stderr; the run goes on).
A rerun with the same --out skips the images already in it, so a killed run is simply started again; it must use the
same --model and --prompt (a different one is refused: use another --out). A file that is not a caption file, or
whose last line is unfinished, is refused unchanged. Default prompt: "Describe this image." for the chat and vqa
templates, and "A picture of" for base (whose caption continues it).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("caption", parents=[model_options(), generation_options()], epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="caption image files and folders into a JSONL file (resumable)",
                              description="Caption every image under PATHS into a JSONL file, in batches; resumable.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file; a rerun skips what it holds")
    p.add_argument("--prompt", type=text,
                   help="the question asked about every image (default: per template, see below)")
    p.add_argument("--batch-size", type=batch_size, default="auto", metavar="N|auto",
                   help="images per batch, or auto: the largest that the GPU memory left after loading holds, up to "
                        "64 (8 on the CPU) (default auto)")
    p.add_argument("--boxes", action="store_true",
                   help="also parse the boxes in each caption (grounding models) into the record, in 000-999 and pixels")
    p.add_argument("--no-compile", action="store_true",
                   help="on a GPU, keep the layers eager (compiling them costs seconds in the first batch and makes "
                        "the rest faster; COGVLM_COMPILE=0 does the same)")
    p.add_argument("--retry-errors", action="store_true",
                   help="try images with an error record again (their old record is removed)")
    return p


def run(args) -> None:
    import_model_code()
    from ..caption import run_caption_job
    from ..caption_dist import JobLock, run_dist_caption_job, torchrun_device, use_dist

    say = None if args.quiet else lambda message: log(args, message)
    if args.no_compile:
        os.environ["COGVLM_COMPILE"] = "0"  # read by cogvlm.speed.compile_wanted, also on every torchrun rank
    distributed = use_dist(args.out)  # under torchrun, or to finish what a torchrun job left: docs/caption_dist.md
    if distributed:
        torchrun_device(args)  # cuda:LOCAL_RANK
    with nullcontext() if distributed else JobLock(args.out):  # (rank 0 of a torchrun job takes it itself)
        (run_dist_caption_job if distributed else run_caption_job)(
            lambda: load_model(args), args.paths, args.out, prompt=args.prompt, template=args.template,
            batch_size=args.batch_size, generation=generation_kwargs(args), model_name=model_name(args.model),
            retry_errors=args.retry_errors, progress=not args.quiet, log=say, boxes=args.boxes,
            warn=lambda message: print(f"cogvlm caption: {message}", file=sys.stderr, flush=True))


def batch_size(text: str):
    return text if text == "auto" else positive_int(text)


batch_size.__name__ = "batch size (a number or auto)"  # argparse's "invalid ... value" message


def model_name(model: str) -> str:
    """What records say in "model": the --model given, a folder without a trailing slash (so that a rerun with
    `dir/` continues a file made with `dir`)."""
    return os.path.normpath(model) if os.path.isdir(model) else model
