"""An optimized model shards with FSDP2 (``fully_shard``) and trains on two CPU ranks (gloo)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp2.py"


@pytest.mark.slow
def test_fsdp2_two_ranks_train_an_optimized_model():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(_EXAMPLE), "--steps", "6"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"fsdp2 world=2 loss ([\d.]+) -> ([\d.]+)", done.stdout)
    assert match, done.stdout[-2000:]
    first, last = map(float, match.groups())
    assert last < first
