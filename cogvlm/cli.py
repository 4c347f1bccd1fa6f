"""The `cogvlm` command line (also `python -m cogvlm`): ask, chat, caption, convert, export-hf.

Everything is built on the Python API (`CogVLM.from_pretrained`, `stream_chat`, `chat_batch`, `cogvlm.convert`).
stdout carries only answers, so that the commands compose in pipes; logs, prompts, progress and errors go to stderr.
Every expected failure (a bad path, an unreadable image, a wrong option, a checkpoint that does not fit) ends with one
line on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .shards import DTYPES
from .prompt import TEMPLATES

DEFAULT_MODEL = "THUDM/cogvlm-chat-hf"
NO_IMAGE = "none"  # `cogvlm ask none "question"`: a text-only prompt
STDIN = "-"  # `cogvlm ask - "question" < photo.jpg`: the image's bytes come from stdin
# Until this module becomes the package cogvlm/cli/ (one module per command), its commands there import through it.
__path__ = [os.path.join(os.path.dirname(__file__), "cli")]

EXAMPLES = """examples:
  cogvlm ask photo.jpg "What is on the table?"
  cogvlm ask none "The capital of France is" --template base
  cogvlm chat --image photo.jpg
  cogvlm caption ./images --out captions.jsonl --batch-size 8
  cogvlm convert ./cogvlm-chat-hf ./cogvlm-chat --dtype bf16
  cogvlm export-hf ./cogvlm-chat ./cogvlm-chat-hf-again
  cogvlm plan --model cogvlm-chat-hf --max-memory 0=20GiB,1=20GiB

Run `cogvlm COMMAND --help` for the options of each command.
"""

ASK_EXAMPLES = """examples:
  cogvlm ask photo.jpg "Describe this image."
  cogvlm ask photo.jpg "Tell a story about it." --temperature 0.8 --top-p 0.9 --seed 0
  curl -s https://example.com/cat.jpg | cogvlm ask - "What animal is this?"
  cogvlm ask none "The capital of France is" --template base --max-new-tokens 8
  cogvlm ask photo.jpg "What is this?" --model ./cogvlm-chat          # a converted or hub-layout folder
  cogvlm ask photo.jpg "What is this?" --device-map auto --max-memory 0=12GiB,1=12GiB   # over two GPUs

IMAGE is a file, "-" for image bytes on stdin, or "none" for a text-only prompt.
Decoding is greedy unless a sampling flag is given (--sample, --temperature, --top-k, --top-p).
"""

CHAT_EXAMPLES = """commands (typed instead of a question):
  /image PATH    start a new conversation about the image at PATH (/image none: text only)
  /clear         forget the conversation so far (the image stays)
  /quit, /exit   leave (so does end of input: Ctrl-D)
  /help          list these commands

On a terminal, prompts go to stderr and a failing turn (say, a bad /image path) is reported and the chat goes on.
With input from a pipe there are no prompts: each question line gets its answer on stdout, followed by a newline,
and a failing turn ends the run with a non-zero status (so that answers can never shift against their questions).

examples:
  cogvlm chat --image photo.jpg
  printf 'What is this?\\nWhat colour is it?\\n' | cogvlm chat --image photo.jpg > answers.txt
"""

CAPTION_EXAMPLES = """examples:
  cogvlm caption ./images --out captions.jsonl
  cogvlm caption a.jpg ./more-images --out captions.jsonl --batch-size 16 --max-new-tokens 128
  cogvlm caption ./images --out captions.jsonl --prompt "Describe this image in detail."
  cogvlm caption ./images --out captions.jsonl --retry-errors    # try the unreadable files again

Folders are searched recursively for *.jpg *.jpeg *.png *.webp *.bmp *.gif *.tif *.tiff (any case), in sorted order.
Each image gets one JSON line: {"image", "caption", "prompt", "model"}, or {"image", "error"} when it cannot be
read (also reported on stderr; the run goes on). A rerun with the same --out skips the images already in it, so a
killed run is simply started again. Default prompt: "Describe this image." for the chat and vqa templates, and
"A picture of" for base (whose caption continues it).
"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a mistyped option gets its reason and a pointer to --help, not the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


positive_int.__name__ = "integer"  # argparse names the type in its message: "invalid integer value: 'x'"


def log(args, message: str) -> None:
    if not args.quiet:
        print(f"cogvlm {args.command}: {message}", file=sys.stderr, flush=True)


# -- options shared by the commands that run the model -------------------------------------------------------------

def model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, hub-layout folder (converted once into $COGVLM_CACHE) or converted folder "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.model to use when the checkpoint has none (default: the checkpoint's own, else "
                        "the one of lmsys/vicuna-7b-v1.5)")
    g.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    g.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: bf16 on GPUs that support it, "
                                                         "else fp32)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    # Multi-device loading (cogvlm/device_map.py, docs/device_map.md): passed on to from_pretrained in load_model.
    g.add_argument("--device-map", metavar="MAP",
                   help="spread the model over devices: auto, balanced, a JSON object or file, or BLOCK=DEVICE pairs "
                        "such as vision=0,adapter=0,embed=0,layers.0-15=0,layers.16-31=1,norm=1,lm_head=1")
    g.add_argument("--max-memory", metavar="BUDGETS",
                   help="memory per device for --device-map auto/balanced, e.g. 0=20GiB,1=20GiB,cpu=60GiB "
                        "(given alone, it means --device-map auto)")
    g.add_argument("--quiet", "-q", action="store_true", help="no log lines or progress bar on stderr (errors stay)")
    return p


def generation_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation (greedy unless --sample, --temperature, --top-k or --top-p is given)")
    g.add_argument("--template", choices=TEMPLATES,
                   help="prompt template (default: the checkpoint's template_version)")
    g.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                   help="answer length limit in tokens (default: as many as fit in the context)")
    g.add_argument("--sample", "--do-sample", dest="sample", action="store_true", help="sample instead of greedy")
    g.add_argument("--temperature", type=float, help="sampling temperature (turns sampling on; default 1.0)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (turns sampling on; default 50, 0: off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling threshold (turns sampling on; default 1.0: off)")
    g.add_argument("--repetition-penalty", type=float, metavar="P",
                   help="Hugging Face's repetition penalty; applies to greedy decoding too (default 1.0: off)")
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the answer at TEXT (not included); may be given several times")
    return p


def generation_kwargs(args) -> dict:
    """The generation keywords of `model.chat` for these flags; only what was given, so library defaults apply."""
    sample = args.sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sample, seed=args.seed, stop=args.stop)
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def load_model(args):
    """`CogVLM.from_pretrained` with the model options; fails early if the checkpoint has no tokenizer."""
    import torch

    from . import CogVLM
    from .chat import tokenizer_of

    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    device_map = None
    if args.device_map or args.max_memory:
        from .parallel.device_map import STRATEGIES, parse_device_map

        device_map = parse_device_map(args.device_map or "auto")
        if args.max_memory and device_map not in STRATEGIES:
            raise ValueError("--max-memory is for --device-map auto or balanced; a written map says where each "
                             "block goes")
    log(args, f"loading {args.model}")
    start = time.monotonic()
    # A planned map reserves KV cache for the batch this command will run (caption's --batch-size; 1 otherwise).
    plan_options = {"batch_size": getattr(args, "batch_size", 1)} if device_map is not None else None
    model = CogVLM.from_pretrained(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                                   tokenizer=args.tokenizer, device_map=device_map, max_memory=args.max_memory,
                                   plan_options=plan_options)
    tokenizer_of(model)  # a missing tokenizer is an error now, before any image work
    devices = ", ".join(sorted({str(p.device) for p in model.parameters()}))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    log(args, f"loaded in {time.monotonic() - start:.1f}s ({devices}; {dtype})")
    return model


def read_image(source: str):
    """IMAGE argument -> a decoded PIL image (or None for `none`). Done before the model loads: a typo in a path
    then fails at once, not after minutes of loading."""
    from .image import load_image

    if source == NO_IMAGE:
        return None
    if source == STDIN:
        if sys.stdin.isatty():
            raise ValueError('IMAGE is "-" but stdin is a terminal; pipe the image in: cogvlm ask - "..." < photo.jpg')
        return load_image(sys.stdin.buffer.read())
    return load_image(source)


def write_answer(pieces) -> str:
    """Stream an answer to stdout as it is generated; returns it whole."""
    answer = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        answer.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(answer)


# -- commands ------------------------------------------------------------------------------------------------------

def cmd_ask(args) -> None:
    image = read_image(args.image)
    model = load_model(args)
    write_answer(model.stream_chat(image, args.question, template=args.template, **generation_kwargs(args)))


def cmd_chat(args) -> None:
    Chat(args).run()


class Chat:
    """The terminal chat: a loop over input lines, each a question or a /command."""

    PROMPT = "you> "

    def __init__(self, args):
        self.args = args
        self.interactive = sys.stdin.isatty()
        if args.image == STDIN:
            raise ValueError("chat reads the conversation from stdin, so --image - cannot be used; give a file")
        self.image = read_image(args.image) if args.image else None
        self.history: list[tuple[str, str]] = []

    def run(self) -> None:
        self.model = load_model(self.args)
        self.generation = generation_kwargs(self.args)
        if self.interactive:
            import readline  # noqa: F401  (line editing and history for input())

            if not self.args.quiet:
                print("cogvlm chat: type a question, /image PATH, /clear or /quit (Ctrl-D)", file=sys.stderr)
        while (line := self.read_line()) is not None:
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        break
                else:
                    self.answer(line)
            except (ValueError, OSError) as e:
                if not self.interactive:
                    raise  # in a script, a turn without its answer must not pass unnoticed
                print(f"error: {one_line(e)}", file=sys.stderr)

    def read_line(self) -> str | None:
        """The next input line, None at end of input. Prompts only on a terminal, and never on a redirected stdout."""
        if self.interactive and sys.stdout.isatty():
            try:
                return input(self.PROMPT)
            except EOFError:
                print(file=sys.stderr)
                return None
        if self.interactive:
            print(self.PROMPT, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/clear":
            self.history.clear()
            self.info("history cleared")
        elif name == "/image":
            if not arg or arg == STDIN:
                raise ValueError("/image needs a file path (or `none` for a text-only chat)")
            self.image = read_image(arg)
            # The reference holds one image per conversation: a new image starts a new conversation.
            self.history.clear()
            self.info(f"new conversation about {arg}" if self.image is not None else "new text-only conversation")
        elif name == "/help":
            print(CHAT_EXAMPLES.split("\n\n")[0], file=sys.stderr)
        else:
            raise ValueError(f"unknown command {name}; commands are /image PATH, /clear, /quit, /help")
        return True

    def answer(self, question: str) -> None:
        pieces = self.model.stream_chat(self.image, question, self.history, template=self.args.template,
                                        **self.generation)
        try:
            answer = write_answer(pieces)
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            print("\n[stopped; this turn is not kept]", file=sys.stderr)  # Ctrl-C ends an answer, not the chat
            return
        self.history.append((question, answer))

    def info(self, message: str) -> None:
        if self.interactive and not self.args.quiet:
            print(message, file=sys.stderr)


def cmd_caption(args) -> None:
    from .caption import CaptionFile, Progress, caption_images, default_prompt, find_images, speed

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


def cmd_convert(args) -> None:
    from .convert import convert

    out = convert(args.src, args.dst, dtype=args.dtype, tokenizer=args.tokenizer, force=args.force)
    print(f"converted {args.src} -> {out}", file=sys.stderr)


def cmd_export_hf(args) -> None:
    from .convert import export_hf

    out = export_hf(args.src, args.out, dtype=args.dtype, force=args.force)
    print(f"exported {args.src} -> {out} (hub layout)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cogvlm",
        description="CogVLM visual language model: ask about images, chat, caption folders, convert checkpoints.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    running = [model_options(), generation_options()]
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("ask", parents=running, formatter_class=raw, epilog=ASK_EXAMPLES,
                       help="answer one question about one image (the answer streams to stdout)",
                       description="Answer one question about one image; only the answer goes to stdout.")
    p.add_argument("image", metavar="IMAGE", help='image file, "-" for image bytes on stdin, "none" for text only')
    p.add_argument("question", metavar="QUESTION", help="the question (or, with --template base, text to continue)")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", parents=running, formatter_class=raw, epilog=CHAT_EXAMPLES,
                       help="multi-turn chat in the terminal (or over a pipe: one answer line per question line)",
                       description="Chat about an image, turn by turn; answers go to stdout.")
    p.add_argument("--image", metavar="IMAGE", help="the image to talk about (default: none; /image PATH later)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("caption", parents=running, formatter_class=raw, epilog=CAPTION_EXAMPLES,
                       help="caption image files and folders into a JSONL file (resumable)",
                       description="Caption every image under PATHS into a JSONL file, in batches; resumable.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file; a rerun skips what it holds")
    p.add_argument("--prompt", help="the question asked about every image (default: per template, see below)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default 8)")
    p.add_argument("--retry-errors", action="store_true",
                   help="try images with an error record again (their old record is removed)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("convert", help="convert a hub-layout checkpoint folder to ours",
                       epilog="example: cogvlm convert ./cogvlm-chat-hf ./cogvlm-chat --dtype bf16")
    p.add_argument("src", help="folder laid out like the hub repository (safetensors or .bin shards + index)")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast weights (default: keep the source dtype)")
    p.add_argument("--tokenizer", help="tokenizer.model to store with the weights (default: SRC/tokenizer.model)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-hf", help="write a converted checkpoint back in the hub layout",
                       epilog="example: cogvlm export-hf ./cogvlm-chat ./cogvlm-chat-hf")
    p.add_argument("src", help="a converted checkpoint folder")
    p.add_argument("out", help="output folder in the hub layout")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export_hf)

    from .cli.plan import add_parser as add_plan_parser  # the command package's module (see __path__ above)

    add_plan_parser(sub)  # `cogvlm plan`: which device holds which block, from memory budgets
    from .finetune import add_finetune_command

    add_finetune_command(sub)  # `cogvlm finetune`: presets experts / lora / full, resume, export
    return parser


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or error.__class__.__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)  # `plan` returns its exit status; the others None
    except KeyboardInterrupt:
        print(f"\ncogvlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`cogvlm ask ... | head -c 10`): not an error of ours. Point stdout at
        # /dev/null so that Python's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError) as e:
        # ImageError, CheckpointError, TokenizerError and bad settings are ValueErrors; missing files OSErrors.
        print(f"cogvlm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print(f"cogvlm {args.command}: error: out of GPU memory; use a smaller --batch-size or --max-new-tokens, "
                  "or --dtype bf16", file=sys.stderr)
            return 1
        raise  # anything else is a bug: keep the traceback
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
