"""Run a kernel test module in a subprocess under ``TRITON_INTERPRET=1``.

The variable must be set before triton is first imported, so the interpreted tests cannot run in
the main pytest process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(module: str) -> str:
    """pytest ``tests/kernels/<module>`` with the Triton interpreter on; returns its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).with_name(module))]
    done = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    return done.stdout
