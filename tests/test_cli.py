"""The `cogvlm` command line, run for real: `python -m cogvlm ...` (and the installed `cogvlm` script) in subprocesses,
on the fixture checkpoint converted once per session with the real tokenizer, with a private COGVLM_CACHE and
HF_HUB_OFFLINE=1. Outputs are compared with the reference's tokens and with the Python API called in-process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvlm import CogVLM
from cogvlm.convert import convert
from cogvlm.tokenizer import Tokenizer

from .test_generate import FIXTURES, MANIFEST, SINGLE, TOKENIZER, case_tensors, gen_steps, until_eos

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = FIXTURES / MANIFEST.get("model_dir", "model")
IMAGES = [FIXTURES / name for name in MANIFEST["images"]]
EOS = MANIFEST["config"]["eos_token_id"]
# The manifest's single conversations without history: what `cogvlm ask` can ask.
ASK_CASES = [n for n in SINGLE if not MANIFEST["cases"][n]["history"]]
DEFAULT_PROMPT = "Describe this image."  # the CLI's caption prompt for the fixture's chat template
TIMEOUT = 300


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    return convert(MODEL_DIR, tmp_path_factory.mktemp("cli-model") / "converted", tokenizer=TOKENIZER)


@pytest.fixture(scope="session")
def model(converted) -> CogVLM:
    return CogVLM.from_pretrained(converted, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    # PYTHONPATH: the installed script must run this tree's code, even if the editable install points elsewhere.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "COGVLM_CACHE": str(tmp_path_factory.mktemp("cli-cache")), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": path}


def entry_point() -> str:
    """The installed `cogvlm` console script: next to this Python first, else on PATH. Its absence is a failure."""
    script = shutil.which("cogvlm", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    if script is None:
        pytest.fail("the `cogvlm` console script is not installed; run `pip install -e . --no-deps`")
    return script


def cogvlm(*args, env: dict, stdin: bytes | str | None = None, check: bool = True, script: bool = False):
    """Run the command line; stdout and stderr come back as text."""
    cmd = [entry_point()] if script else [sys.executable, "-m", "cogvlm"]
    data = stdin.encode() if isinstance(stdin, str) else stdin
    r = subprocess.run(cmd + [str(a) for a in args], input=data, capture_output=True, env=env, timeout=TIMEOUT)
    r.stdout, r.stderr = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    if check:
        assert r.returncode == 0, f"exit status {r.returncode}; stderr:\n{r.stderr}"
    return r


def reference_answer(name: str) -> str:
    """The reference's greedy answer to a manifest case, as text."""
    ids = until_eos(case_tensors(name)["gen_ids"][0].tolist(), EOS)
    return Tokenizer(TOKENIZER).decode(ids, skip_special_tokens=True)


def read_jsonl(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the file ends with an unfinished line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]  # every line must be valid JSON


# -- ask --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ASK_CASES)
def test_ask_prints_exactly_the_reference_greedy_answer(name, converted, env):
    case = MANIFEST["cases"][name]
    image = FIXTURES / case["image"] if case.get("image") else "none"
    r = cogvlm("ask", image, case["query"], "--model", converted, "--template", case["template_version"],
               "--max-new-tokens", gen_steps(name), "--quiet", env=env)
    assert r.stdout == reference_answer(name) + "\n"
    assert r.stderr == ""  # --quiet: nothing but errors on stderr


def test_ask_through_the_installed_script_on_a_hub_layout_folder(tmp_path, env):
    """The `cogvlm` entry point; the image's bytes on stdin (`-`); a hub-layout folder converted into the cache with
    --tokenizer; logs on stderr, only the answer on stdout."""
    name = "case1_chat_image"
    case = MANIFEST["cases"][name]
    fresh = {**env, "COGVLM_CACHE": str(tmp_path / "cache")}
    r = cogvlm("ask", "-", case["query"], "--model", MODEL_DIR, "--tokenizer", TOKENIZER,
               "--max-new-tokens", gen_steps(name), env=fresh, stdin=(FIXTURES / case["image"]).read_bytes(),
               script=True)
    assert r.stdout == reference_answer(name) + "\n"
    assert "converting" in r.stderr and "loading" in r.stderr
    assert [p.name.split("--")[0] for p in (tmp_path / "cache").iterdir()] == ["local"]


def test_ask_with_a_device_map(converted, env):
    """--device-map reaches from_pretrained: planned from --max-memory (all on the CPU here), same answer."""
    name = "case1_chat_image"
    case = MANIFEST["cases"][name]
    r = cogvlm("ask", FIXTURES / case["image"], case["query"], "--model", converted, "--max-new-tokens",
               gen_steps(name), "--device-map", "balanced", "--max-memory", "cpu=4GiB", env=env)
    assert r.stdout == reference_answer(name) + "\n"


# -- chat -------------------------------------------------------------------------------------------------------

def test_chat_over_a_pipe_answers_each_question_with_its_history(converted, model, env):
    img0, img1 = IMAGES
    q = ["What is in the picture?", "What colour is it?", "Is it big?", "And in this one?"]
    gen = dict(max_new_tokens=6)
    a1 = model.chat(img0, q[0], **gen)
    a2 = model.chat(img0, q[1], history=[(q[0], a1)], **gen)
    assert a2 != model.chat(img0, q[1], **gen), "the fixture cannot tell whether the history is used"
    a3 = model.chat(img0, q[2], **gen)  # after /clear: same image, no history
    a4 = model.chat(img1, q[3], **gen)  # after /image: the new image, a new conversation
    stdin = f"{q[0]}\n{q[1]}\n/clear\n{q[2]}\n\n/image {img1}\n{q[3]}\n/quit\nnever asked\n"
    r = cogvlm("chat", "--image", img0, "--model", converted, "--max-new-tokens", 6, env=env, stdin=stdin)
    # Answers only (no prompts when stdin is not a terminal); the empty line gets an empty line, so that every line
    # that is not a /command has its line in the output.
    assert r.stdout == f"{a1}\n{a2}\n{a3}\n\n{a4}\n"
    assert "you>" not in r.stderr

    # End of input ends the chat as /quit does.
    r = cogvlm("chat", "--image", img0, "--model", converted, "--max-new-tokens", 6, env=env, stdin=f"{q[0]}\n")
    assert r.stdout == f"{a1}\n"


# -- errors and help --------------------------------------------------------------------------------------------

ERRORS = {
    "missing image": (["ask", "{missing}", "What is this?", "--model", "{model}"],
                      r"^cogvlm ask: error: cannot read image .*missing\.png: file not found$"),
    "unknown template": (["ask", "{image}", "What is this?", "--model", "{model}", "--template", "chatty"],
                         r"^cogvlm ask: error: argument --template: invalid choice: 'chatty' \(choose from "),
    "no such model folder": (["ask", "{image}", "What is this?", "--model", "{nowhere}"],
                             r"^cogvlm ask: error: .*nowhere is not a checkpoint folder"),
    "too many new tokens": (["ask", "{image}", "What is this?", "--model", "{model}", "--max-new-tokens", "5000"],
                            r"^cogvlm ask: error: .*max_position_embeddings \(2048\).*at most \d+ new tokens$"),
    "missing caption path": (["caption", "{missing}", "--out", "{out}", "--model", "{model}"],
                             r"^cogvlm caption: error: no such file or folder: .*missing\.png$"),
    "incomplete device map": (["ask", "{image}", "What is this?", "--model", "{model}", "--device-map", "vision=cpu"],
                              r"^cogvlm ask: error: device map leaves \d+ block\(s\) unassigned: adapter, "),
    "missing chat image": (["chat", "--image", "{missing}", "--model", "{model}"],
                           r"^cogvlm chat: error: cannot read image .*missing\.png: file not found$"),
}


@pytest.mark.parametrize("what", ERRORS)
def test_errors_are_one_line_and_a_nonzero_exit(what, tmp_path, converted, env):
    args, message = ERRORS[what]
    paths = dict(missing=tmp_path / "missing.png", model=converted, nowhere=tmp_path / "nowhere", image=IMAGES[0],
                 out=tmp_path / "out.jsonl")
    r = cogvlm(*[a.format(**paths) for a in args], "--quiet", env=env, check=False)
    assert r.returncode != 0 and r.stdout == ""
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert re.search(message, r.stderr.strip()), r.stderr


def test_a_failing_turn_ends_a_piped_chat(converted, model, env):
    """Over a pipe, an answer that cannot come must not pass unnoticed: the answers so far, then an error."""
    stdin = f"What is this?\n/image {IMAGES[0].parent / 'missing.png'}\nAnd now?\n"
    r = cogvlm("chat", "--image", IMAGES[0], "--model", converted, "--max-new-tokens", 4, "--quiet", env=env,
               stdin=stdin, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stdout == model.chat(IMAGES[0], "What is this?", max_new_tokens=4) + "\n"
    assert re.fullmatch(r"cogvlm chat: error: cannot read image .*missing\.png: file not found\n", r.stderr)


@pytest.mark.parametrize("command", ["", "ask", "chat", "caption", "convert", "export-hf"])
def test_help(command, env):
    r = cogvlm(*([command] if command else []), "--help", env=env)
    assert r.stdout.startswith(f"usage: cogvlm {command}".rstrip())
    assert "example" in r.stdout
    if command in ("ask", "chat", "caption"):
        for flag in ("--model", "--tokenizer", "--dtype", "--device", "--template", "--max-new-tokens",
                     "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--sample", "--seed", "--quiet",
                     "--device-map", "--max-memory"):
            assert flag in r.stdout


def registered_commands() -> list[str]:
    """Every command the parser knows, so that a new command module is checked without editing this test."""
    import argparse

    from cogvlm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


COMMANDS = registered_commands()
NO_TORCH = """
import sys
from cogvlm.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert e.code == 0, e.code
assert "torch" not in sys.modules, "torch was imported"
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"]] + [[c, "--help"] for c in COMMANDS])
def test_help_and_version_do_not_import_torch(args, env):
    assert {"ask", "chat", "caption", "convert", "export-hf", "plan", "finetune"} <= set(COMMANDS)
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, env=env,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cogvlm 0.1.0\n" if args == ["--version"] else "usage: cogvlm")


def test_version_is_the_package_version(env):
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert cogvlm("--version", env=env).stdout == f"cogvlm {version}\n"


def test_choices_written_in_the_cli_are_the_real_ones():
    """The CLI spells its choices out (so that --help needs no torch); they must be the library's."""
    from cogvlm.cli import finetune as cli_finetune, options, plan as cli_plan
    from cogvlm.parallel.device_map import STRATEGIES
    from cogvlm.finetune import PRESETS
    from cogvlm.prompt import TEMPLATES
    from cogvlm.shards import DTYPES

    assert options.DTYPE_CHOICES == cli_finetune.DTYPES == tuple(DTYPES)
    assert sorted(options.TEMPLATE_CHOICES) == sorted(cli_finetune.TEMPLATES) == sorted(TEMPLATES)
    assert cli_plan.STRATEGY_CHOICES == tuple(STRATEGIES)
    assert cli_finetune.PRESETS == tuple(PRESETS)


@pytest.mark.parametrize("command", ["ask", "chat", "caption"])
def test_device_map_example_survives_line_wrapping(command, env):
    """Pasting the example from --help must work, however narrow the terminal."""
    from cogvlm.cli.options import DEVICE_MAP_EXAMPLE

    r = cogvlm(command, "--help", env={**env, "COLUMNS": "50"})
    assert any(line.split()[-1:] == [DEVICE_MAP_EXAMPLE] and "--device-map" in line for line in r.stdout.splitlines())


# -- odd bytes, odd inputs --------------------------------------------------------------------------------------

def run_bytes(args: list, env: dict, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """The command line with arguments as raw bytes (an argument that is not UTF-8 cannot be a str)."""
    cmd = [os.fsencode(sys.executable), b"-m", b"cogvlm"] + [a if isinstance(a, bytes) else os.fsencode(str(a))
                                                             for a in args]
    r = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=TIMEOUT)
    r.stdout, r.stderr = r.stdout.decode("utf-8"), r.stderr.decode("utf-8", "backslashreplace")
    return r


BAD_TEXT = {
    "question": (["ask", "{image}", b"caf\xe9?"], "ask", r"argument QUESTION: is not valid UTF-8 \(byte 0xe9 at "
                                                         r"character 4\); give the text in UTF-8"),
    "prompt": (["caption", "{image}", "--out", "{out}", "--prompt", b"\xff\xfe"], "caption",
               r"argument --prompt: is not valid UTF-8 \(byte 0xff at character 1\); give the text in UTF-8"),
    "stop string": (["ask", "{image}", "What?", "--stop", b"end\x80"], "ask",
                    r"argument --stop: is not valid UTF-8 \(byte 0x80 at character 4\); give the text in UTF-8"),
}


@pytest.mark.parametrize("what", BAD_TEXT)
def test_text_arguments_that_are_not_utf8_get_one_line_naming_them(what, tmp_path, converted, env):
    args, command, message = BAD_TEXT[what]
    out = tmp_path / "out.jsonl"
    args = [a.format(image=IMAGES[0], out=out) if isinstance(a, str) else a for a in args]
    r = run_bytes([*args, "--model", converted], env)
    assert r.returncode == 2 and r.stdout == "" and not out.exists()
    assert re.fullmatch(rf"cogvlm {command}: error: {message} \(see `cogvlm {command} --help`\)\n", r.stderr), r.stderr


def test_piped_chat_keeps_answers_in_line_with_questions(converted, model, env):
    """Every line that is not a /command has its line on stdout: blank and white-space lines an empty one, Windows
    line ends are no part of the question; a line that is not UTF-8 ends the run after the answers so far, with one
    line naming it."""
    gen = dict(max_new_tokens=4)
    q1, q2, q3 = "What is in the picture?", "What colour is it?", "Is it big?"
    a1 = model.chat(IMAGES[0], q1, **gen)
    a2 = model.chat(IMAGES[0], q2, history=[(q1, a1)], **gen)
    a3 = model.chat(IMAGES[0], q3, **gen)
    stdin = f"{q1}\n\n   \n{q2}\r\n/clear\n{q3}\n".encode() + b"caf\xe9?\nnever answered\n"
    r = run_bytes(["chat", "--image", IMAGES[0], "--model", converted, "--max-new-tokens", 4, "--quiet"], env, stdin)
    assert r.stdout == f"{a1}\n\n\n{a2}\n{a3}\n"
    assert r.returncode == 1
    assert r.stderr == ("cogvlm chat: error: <stdin> line 7 is not valid UTF-8 (byte 0xe9 at byte 4); convert the "
                        "input to UTF-8, e.g. with iconv\n")


def test_an_answer_with_line_breaks_stays_on_one_line_over_a_pipe(capsys):
    from cogvlm.cli.ask import write_answer

    assert write_answer(iter(["1. a\n2", ". b\n"]), one_line=True) == "1. a\n2. b\n"  # the history keeps it whole
    assert capsys.readouterr().out == "1. a\\n2. b\\n\n"
    assert write_answer(iter(["x\ny"])) == "x\ny" and capsys.readouterr().out == "x\ny\n"  # a terminal: as it is


def test_image_bytes_on_stdin_are_named_stdin_in_errors(converted, env):
    r = cogvlm("ask", "-", "What is this?", "--model", converted, env=env, stdin=b"GIF89a but not really",
               check=False)
    assert r.returncode == 1 and r.stderr == "cogvlm ask: error: cannot read image <stdin>: not a recognised image " \
                                             "format\n"


NO_DYNAMO = """
import sys
from cogvlm.cli import main
assert main(sys.argv[1:]) == 0
assert "torch._dynamo" not in sys.modules, "building the model imported torch._dynamo"
"""


def test_ask_does_not_import_the_compiler(converted, env):
    """Start-up: building the model on the meta device must not run nn.init there, whose random fills import
    torch._dynamo (2-3 s of a tiny model's `ask`; bench/startup.py measures the whole start)."""
    name = "case1_chat_image"
    case = MANIFEST["cases"][name]
    r = subprocess.run([sys.executable, "-c", NO_DYNAMO, "ask", str(FIXTURES / case["image"]), case["query"],
                        "--model", str(converted), "--max-new-tokens", str(gen_steps(name)), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference_answer(name) + "\n"
