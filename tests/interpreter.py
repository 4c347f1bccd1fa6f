"""Running a test module's check in Triton's CPU interpreter: in a child process, because the interpreter is chosen
when the kernels are defined (at import)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_interpreted(module: str, function: str, timeout: int = 900) -> None:
    """Calls `tests.<module>.<function>()` with TRITON_INTERPRET=1; fails with the child's error output."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", f"import tests.{module} as t; t.{function}()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
