"""The `cogvlm` command line (also `python -m cogvlm`): one module per command, listed in COMMANDS.

Each command module has `add_parser(subparsers) -> argparse.ArgumentParser` and `run(args) -> int | None`, and imports
torch (or any module that does) only inside `run`, so that `cogvlm --help` and every `cogvlm CMD --help` are quick.
stdout carries only answers, so that the commands compose in pipes; logs, prompts, progress and errors go to stderr.
Every expected failure ends with one line `cogvlm CMD: error: ...` on stderr and a non-zero exit status (2 for a
wrong use of the command line, 1 otherwise), never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from .options import Parser, UsageError, one_line

__all__ = ["COMMANDS", "main", "build_parser"]

COMMANDS = ("ask", "chat", "caption", "ground", "explain", "serve", "convert", "quantize", "plan", "finetune")  # modules of cogvlm.cli, in --help order

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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cogvlm",
        description="CogVLM visual language model: ask about images, chat, caption folders, convert checkpoints.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cogvlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        before = set(sub.choices)
        module.add_parser(sub)
        for command in sub.choices.keys() - before:  # a module may add several commands (convert, export-hf)
            sub.choices[command].set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]) and return its exit status.

    Run as the program (argv None) after torch was imported, it ends the process itself once stdout and stderr are
    flushed (os._exit): the interpreter's teardown of torch's modules takes 1-3 s after the answer and has nothing of
    ours left to do (every file we write is closed by then, caption records are fsync'ed)."""
    # Idle OpenMP threads sleep instead of spinning: on a busy or small machine spinning workers steal the cores that
    # the work (or, on a GPU, the thread launching its kernels) needs; a short answer on 2 shared cores ran 2-5x
    # slower (bench/startup.py). Must be set before torch loads its OpenMP runtime; the user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    status = run_command(argv)
    if argv is None and "torch" in sys.modules:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            status = status or 141
        sys.stderr.flush()
        os._exit(status)
    return status


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args._module.run(args)  # `plan` returns its exit status; the others None
    except KeyboardInterrupt:
        print(f"\ncogvlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`cogvlm ask ... | head -c 10`): not an error of ours. Point stdout at
        # /dev/null so that Python's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UsageError as e:
        print(f"cogvlm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        # ImageError, CheckpointError, TokenizerError and bad settings are ValueErrors; missing files OSErrors.
        print(f"cogvlm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
            print(f"cogvlm {args.command}: error: out of GPU memory; use a smaller --batch-size or --max-new-tokens, "
                  "or --dtype bf16", file=sys.stderr)
            return 1
        raise  # anything else is a bug: keep the traceback
    return status or 0
