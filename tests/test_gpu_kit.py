"""The GPU check kit's CPU smoke run (``benchmarks/gpu/check.py --cpu-smoke``), so the kit a GPU
session runs cannot rot: every check runs at toy sizes, the Triton kernels through the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_kit_runs_its_cpu_smoke_and_every_row_passes():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "check.py"), "--cpu-smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("kernel", "planned", "compiled", "QLoRA",
                                                                          "offload", "cut CE", "chunked"))]
    assert len(rows) == 13 and all("  ok  " in r or "  skip  " in r for r in rows), done.stdout
    assert sum("  ok  " in r for r in rows) == 12 and "offload step" in next(r for r in rows if "skip" in r)
