"""Start-up time of the command line: `cogvlm --help` and `cogvlm ask` on the shipped tiny model, wall clock; and
`import torch` alone, the floor under every command that runs the model.

    python bench/startup.py [--runs 7] [--json OUT.json]

Each command runs `--runs` times in a fresh process (`python -m cogvlm ...`, offline, a private cache), after one
run not counted that leaves the modules' bytecode cached, as an installed package has it (PYTHONDONTWRITEBYTECODE is
dropped for these runs). The table gives the best and the median wall time and the median CPU time (user + system).
The best run is the figure to compare on a shared machine: other processes only ever add time. A last `ask` run is
split into phases from inside the process: interpreter start, `import torch`, the command until its answer is
written, and the exit after it.
Targets (issue 10): `--help` <= 0.5 s, `ask` <= 2.5 s on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny-shapes"
ASK = ["ask", str(REPO / "examples" / "images" / "shape1.png"), "What colour is the shape?", "--model", str(TINY),
       "--quiet"]
# `import torch` alone is the floor under `ask`: every command that runs the model needs it.
COMMANDS = {"cogvlm --help": ["-m", "cogvlm", "--help"], "cogvlm ask (tiny model)": ["-m", "cogvlm", *ASK],
            "python -c 'import torch' (floor)": ["-c", "import os, torch; os._exit(0)"]}
TARGETS = {"cogvlm --help": 0.5, "cogvlm ask (tiny model)": 2.5, "python -c 'import torch' (floor)": None}

# Runs the command as the program does (main() on sys.argv) and reports when torch was imported and when the command
# ended its process (main's os._exit, or its return); the parent sees the exit as the rest of its wall time.
PHASES = """
import json, os, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()

def report():
    print(json.dumps({"torch": t1 - t0, "command": time.perf_counter() - t1, "end": time.time()}), file=sys.stderr)
    sys.stderr.flush()

exit_now = os._exit
os._exit = lambda status: (report(), exit_now(status))
from cogvlm.cli import main
status = main()
report()
sys.exit(status)
"""


def run(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall and CPU seconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), r


def phases(env: dict) -> dict:
    """One `ask` run split into phases (seconds)."""
    start_wall, start = time.time(), time.perf_counter()
    _, _, r = run([sys.executable, "-c", PHASES, *ASK], env)
    total = time.perf_counter() - start
    inside = json.loads(r.stderr.strip().splitlines()[-1])
    exit_s = time.time() - inside["end"]
    python = total - inside["torch"] - inside["command"] - exit_s
    return {"python start": python, "import torch": inside["torch"], "command (load + answer)": inside["command"],
            "exit": exit_s, "total": total, "started": start_wall}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_1min": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="cogvlm-startup-")
    env = {**os.environ, "COGVLM_CACHE": cache, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    r: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": args.runs,
               "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                        text=True, cwd=REPO).stdout.strip(),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": {}}
    for name, argv in COMMANDS.items():
        runs = [run([sys.executable, *argv], env) for _ in range(args.runs + 1)][1:]
        r["results"][name] = {"best_s": min(t[0] for t in runs), "median_s": statistics.median(t[0] for t in runs),
                              "median_cpu_s": statistics.median(t[1] for t in runs), "target_s": TARGETS[name]}
    r["ask_phases_s"] = phases(env)
    r["machine"]["load_average_1min_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    m = r["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}; load average "
          f"{m['load_average_1min']:.1f} -> {m['load_average_1min_after']:.1f}; {r['date']}, commit {r['commit']}")
    print("| command | best wall | median wall | median CPU | target |\n| --- | --- | --- | --- | --- |")
    for name, x in r["results"].items():
        target = f"<= {x['target_s']} s" if x["target_s"] else ""
        print(f"| `{name}` | {x['best_s']:.2f} s | {x['median_s']:.2f} s | {x['median_cpu_s']:.2f} s | {target} |")
    print("ask, one run by phase: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["ask_phases_s"].items()
                                                 if k != "started"))


if __name__ == "__main__":
    main()
