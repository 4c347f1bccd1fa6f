"""What the commands share: the model and generation option groups, loading a model from them, small argument types.

Nothing here imports torch at import time (the choices below are plain strings, checked against the real tables by
tests/test_cli.py), so that `cogvlm --help` stays fast; `load_model` imports the model stack when it runs.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

DEFAULT_MODEL = "THUDM/cogvlm-chat-hf"
NO_IMAGE = "none"  # `cogvlm ask none "question"`: a text-only prompt
STDIN = "-"  # `cogvlm ask - "question" < photo.jpg`: the image's bytes come from stdin
STDIN_NAME = "<stdin>"  # how errors name it
DTYPE_CHOICES = ("bf16", "fp16", "fp32")  # = cogvlm.shards.DTYPES
TEMPLATE_CHOICES = ("base", "chat", "vqa")  # = cogvlm.prompt.TEMPLATES
QUANTIZE_CHOICES = ("int8", "int4")  # = cogvlm.quantize.MODES
GROUP_SIZE_CHOICES = (32, 64, 128, 256)  # = cogvlm.quantize.GROUP_SIZES

# Written out in the epilogs (raw text), never in an option's help: argparse re-wraps help text and would cut it.
DEVICE_MAP_EXAMPLE = "vision=0,adapter=0,embed=0,layers.0-15=0,layers.16-31=1,norm=1,lm_head=1"


class UsageError(Exception):
    """A wrong use of the command line: printed as one line `cogvlm CMD: error: ...`, exit status 2."""


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


def utf8_problem(text: str) -> str | None:
    """Why `text` is not valid UTF-8, or None. Python hands bytes that are not UTF-8 (in argv, a file name, a stdin
    line read with surrogateescape) over as lone surrogates U+DC80..U+DCFF; the model's tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        what = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"lone surrogate U+{bad:04X}"
        return f"is not valid UTF-8 ({what} at character {e.start + 1})"
    return None


def text(value: str) -> str:
    """argparse type of free text (a question, a prompt, a stop string): valid UTF-8 or a one-line error."""
    problem = utf8_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}; give the text in UTF-8")
    return value


def log(args, message: str) -> None:
    if not args.quiet:
        print(f"cogvlm {args.command}: {message}", file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or error.__class__.__name__


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
    g.add_argument("--dtype", choices=DTYPE_CHOICES, help="weights' dtype (default: bf16 on GPUs that support it, "
                                                          "else fp32)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    # Multi-device loading (cogvlm/parallel/, docs/device_map.md): passed on to from_pretrained in load_model.
    g.add_argument("--device-map", metavar="MAP",
                   help="spread the model over devices: auto, balanced, a JSON object or file, or BLOCK=DEVICE pairs "
                        "(an example is below)")
    g.add_argument("--max-memory", metavar="BUDGETS",
                   help="memory per device for --device-map auto/balanced, e.g. 0=20GiB,1=20GiB,cpu=60GiB "
                        "(given alone, it means --device-map auto)")
    g.add_argument("--quiet", "-q", action="store_true", help="no log lines or progress bar on stderr (errors stay)")
    q = p.add_argument_group("quantization (docs/quantize.md; a `cogvlm quantize` folder loads quantized without it)")
    q.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="quantize the weights while loading: int8 (CogVLM-17B in ~19 GB) or int4 (~11 GB)")
    q.add_argument("--group-size", type=int, choices=GROUP_SIZE_CHOICES,
                   help="int4: inputs per scale and zero (default 128)")
    q.add_argument("--no-quantize-vision", dest="quantize_vision", action="store_false", default=None,
                   help="with --quantize: keep the ViT in --dtype")
    return p


def generation_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation (greedy unless --sample, --temperature, --top-k or --top-p is given)")
    g.add_argument("--template", choices=TEMPLATE_CHOICES,
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
    g.add_argument("--stop", action="append", type=text, metavar="TEXT",
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


def import_model_code() -> None:
    """Import torch and the model code (what the commands that run the model call first) with the garbage collector
    paused, then freeze what was built: those ~170k objects live as long as the process, and every full collection
    would walk them all again (together 0.5-0.7 s of CPU of a small model's start-up, measured by bench/startup.py)."""
    if "cogvlm.api" in sys.modules:
        return
    gc.disable()
    try:
        from .. import api, chat, image  # noqa: F401  (torch, the model, loading, generation, PIL)
    finally:
        gc.freeze()
        gc.enable()


def load_model(args):
    """`CogVLM.from_pretrained` with the model options; fails early if the checkpoint has no tokenizer."""
    import_model_code()
    import torch

    from .. import CogVLM
    from ..chat import tokenizer_of

    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    device_map = None
    if args.device_map or args.max_memory:
        from ..parallel.device_map import STRATEGIES, parse_device_map

        device_map = parse_device_map(args.device_map or "auto")
        if args.max_memory and device_map not in STRATEGIES:
            raise UsageError("--max-memory is for --device-map auto or balanced; a written map says where each "
                             "block goes")
    if args.group_size is not None and args.quantize != "int4":
        raise UsageError("--group-size is for --quantize int4")
    if args.quantize_vision is not None and args.quantize is None:
        raise UsageError("--no-quantize-vision is for --quantize int8 or int4")
    log(args, f"loading {args.model}")
    start = time.monotonic()
    # A planned map reserves KV cache for the batch this command will run (caption's --batch-size; 1 otherwise, and
    # for --batch-size auto, which then fills what the placed model leaves free).
    batch = getattr(args, "batch_size", 1)
    plan_options = {"batch_size": 1 if batch == "auto" else batch} if device_map is not None else None
    model = CogVLM.from_pretrained(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                                   tokenizer=args.tokenizer, device_map=device_map, max_memory=args.max_memory,
                                   plan_options=plan_options, quantize=args.quantize, group_size=args.group_size,
                                   quantize_vision=args.quantize_vision)
    tokenizer_of(model)  # a missing tokenizer is an error now, before any image work
    devices = ", ".join(sorted({str(p.device) for p in model.parameters()}))
    log(args, f"loaded in {time.monotonic() - start:.1f}s ({devices}; {str(model.dtype).removeprefix('torch.')})")
    return model
