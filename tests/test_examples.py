"""Every file in ``examples/`` runs, at a tiny size, as a user runs it (a new process, from the repo root).

``examples/fsdp2.py`` needs two processes: ``tests/e2e/test_fsdp2.py`` runs it (marked slow).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(_ROOT / "examples" / script), *args], cwd=_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_examples_are_all_run_somewhere():
    assert {p.name for p in (_ROOT / "examples").glob("*.py")} == {"finetune.py", "hf_trainer.py", "fsdp2.py"}


def test_the_demo_runs_and_its_plan_matches_its_measurement():
    out = _run("finetune.py", "--steps", "2", "--batch", "4", "--seq", "64", "--budget-gb", "0.06")
    assert "memopt plan v6" in out and "step   1" in out
    line = next(line for line in out.splitlines() if line.startswith("peak of a real step"))
    measured, predicted = (float(line.split(word)[1].split()[0]) for word in ("measured", "predicted"))
    assert measured <= predicted <= 0.06 * 1024  # MiB: the plan holds, inside the budget


@pytest.mark.parametrize("method", ["rso", pytest.param("lisa", marks=pytest.mark.slow),
                                    pytest.param("owlore", marks=pytest.mark.slow),
                                    pytest.param("randlora", marks=pytest.mark.slow)])
def test_the_demo_trains_each_founding_method_inside_its_plan(method):
    out = _run("finetune.py", "--steps", "2", "--batch", "4", "--seq", "64", "--budget-gb", "0.5", "--method", method)
    assert f"method={method}" in out and "step   1" in out
    line = next(line for line in out.splitlines() if line.startswith("peak of a real step"))
    measured, predicted = (float(line.split(word)[1].split()[0]) for word in ("measured", "predicted"))
    assert measured <= predicted * 1.001  # the plan holds for this method's step too


def test_the_hf_trainer_example_trains_and_checkpoints_only_the_trained_tensors():
    pytest.importorskip("transformers")
    out = _run("hf_trainer.py", "--steps", "2")
    assert "predicted peak" in out
    files = ast.literal_eval(out.split("checkpoint-1:")[1].strip().splitlines()[0])  # the printed list of names
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
