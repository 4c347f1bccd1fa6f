"""`cogvlm chat [--image IMAGE]`: the terminal chat, a loop over input lines, each a question or a /command."""
from __future__ import annotations

import argparse
import sys

from .ask import read_image, write_answer
from .options import (DEVICE_MAP_EXAMPLE, STDIN, STDIN_NAME, generation_kwargs, generation_options, load_model,
                      model_options, one_line, utf8_problem)

COMMANDS_HELP = """commands (typed instead of a question):
  /image PATH    start a new conversation about the image at PATH (/image none: text only)
  /clear         forget the conversation so far (the image stays)
  /quit, /exit   leave (so does end of input: Ctrl-D)
  /help          list these commands"""

EXAMPLES = f"""{COMMANDS_HELP}

On a terminal, prompts go to stderr and a failing turn (say, a bad /image path) is reported and the chat goes on.
With input from a pipe there are no prompts and every line that is not a /command gets exactly one line on stdout:
its answer (a line break inside an answer is written as \\n), or an empty line for an empty input line. A failing
turn (or a line that is not UTF-8) ends the run with a non-zero status, so answers never shift against questions.

examples:
  cogvlm chat --image photo.jpg
  printf 'What is this?\\nWhat colour is it?\\n' | cogvlm chat --image photo.jpg > answers.txt
  cogvlm chat --image photo.jpg --device-map {DEVICE_MAP_EXAMPLE}
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", parents=[model_options(), generation_options()], epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="multi-turn chat in the terminal (or over a pipe: one answer line per question "
                                   "line)",
                              description="Chat about an image, turn by turn; answers go to stdout.")
    p.add_argument("--image", metavar="IMAGE", help="the image to talk about (default: none; /image PATH later)")
    return p


def run(args) -> None:
    Chat(args).run()


class Chat:
    PROMPT = "you> "

    def __init__(self, args):
        self.args = args
        self.interactive = sys.stdin.isatty()
        if args.image == STDIN:
            raise ValueError("chat reads the conversation from stdin, so --image - cannot be used; give a file")
        self.image = read_image(args.image) if args.image else None
        self.history: list[tuple[str, str]] = []
        self.line_number = 0

    def run(self) -> None:
        self.model = load_model(self.args)
        self.generation = generation_kwargs(self.args)
        if self.interactive:
            import readline  # noqa: F401  (line editing and history for input())

            if not self.args.quiet:
                print("cogvlm chat: type a question, /image PATH, /clear or /quit (Ctrl-D)", file=sys.stderr)
        while True:
            try:
                line = self.read_line()
                if line is None:
                    break
                line = line.strip()
                if line.startswith("/"):
                    if not self.command(line):
                        break
                elif line:
                    self.answer(line)
                elif not self.interactive:
                    write_answer([])  # an empty line gets an empty answer line: the answers stay in step
            except (ValueError, OSError) as e:
                if not self.interactive:
                    raise  # in a script, a turn without its answer must not pass unnoticed
                print(f"error: {one_line(e)}", file=sys.stderr)

    def read_line(self) -> str | None:
        """The next input line, None at end of input. Prompts only on a terminal, and never on a redirected stdout.
        A line that is not UTF-8 is a ValueError naming it."""
        self.line_number += 1
        if self.interactive and sys.stdout.isatty():
            try:
                line = input(self.PROMPT)
            except EOFError:
                print(file=sys.stderr)
                return None
            except UnicodeDecodeError as e:  # a terminal whose encoding is strict
                raise ValueError(f"that line is not valid UTF-8 ({e.reason} at byte {e.start + 1}); type it again")
            problem = utf8_problem(line)
            if problem:
                raise ValueError(f"that line {problem}; type it again")
            return line
        if self.interactive:
            print(self.PROMPT, end="", file=sys.stderr, flush=True)
        raw = sys.stdin.buffer.readline()
        if raw == b"":
            return None
        try:
            return raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{STDIN_NAME} line {self.line_number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                             f"byte {e.start + 1}); convert the input to UTF-8, e.g. with iconv") from None

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
            print(COMMANDS_HELP, file=sys.stderr)
        else:
            raise ValueError(f"unknown command {name}; commands are /image PATH, /clear, /quit, /help")
        return True

    def answer(self, question: str) -> None:
        pieces = self.model.stream_chat(self.image, question, self.history, template=self.args.template,
                                        **self.generation)
        try:
            answer = write_answer(pieces, one_line=not self.interactive)
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            print("\n[stopped; this turn is not kept]", file=sys.stderr)  # Ctrl-C ends an answer, not the chat
            return
        self.history.append((question, answer))

    def info(self, message: str) -> None:
        if self.interactive and not self.args.quiet:
            print(message, file=sys.stderr)
