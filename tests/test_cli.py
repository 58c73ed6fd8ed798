"""`memopt plan` / `memopt inspect`: dry-run plans from configs, exit codes, and helpful errors."""

from __future__ import annotations

import json
import sys

import pytest

import memopt
from memopt.cli import EXIT_BAD_INPUT, EXIT_INFEASIBLE, HF_PRESETS, _hf_config, _meta_model, main
from memopt.plan import load_plan

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 96, "max_position_embeddings": 64}


@pytest.fixture()
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _plan_args(config: str, budget: str, *extra: str) -> list[str]:
    return ["plan", "--hf-config", config, "--batch", "2", "--seq", "16", "--budget", budget, "--method", "lora",
            "--device", "rtx4090", "--reserve", "0", "--rank", "4", *extra]


def test_plan_prints_a_summary_saves_json_and_inspect_prints_it_again(tiny_config, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(_plan_args(tiny_config, "0.01", "--json", str(out))) == 0
    printed = capsys.readouterr()
    plan = load_plan(out)
    assert printed.out.strip() == plan.summary().strip()
    assert "tracing the joint forward + backward step" in printed.err  # progress goes to stderr
    assert plan.device.name == "rtx4090" and plan.input_shapes == {"input_ids": (2, 16), "labels": (2, 16)}
    assert plan.memory is None and any("was not simulated" in n for n in plan.notes)
    assert main(["inspect", str(out)]) == 0
    assert capsys.readouterr().out.strip() == plan.summary().strip()


def test_an_infeasible_budget_exits_3_with_the_smallest_feasible_budget_and_what_else_fits(tiny_config, capsys):
    assert main(_plan_args(tiny_config, "0.0001")) == EXIT_INFEASIBLE
    printed = capsys.readouterr()
    assert "smallest feasible budget:" in printed.out and "does not fit" in printed.err
    # Quantized frozen weights: each option's own smallest budget, planned (here none fits 0.1 MiB).
    assert "with --quantize int8: smallest feasible budget" in printed.out
    assert "with --quantize nf4: smallest feasible budget" in printed.out and "does not fit either" in printed.out
    least = float(printed.out.split("smallest feasible budget: ")[1].split()[0])
    nf4 = float(printed.out.split("with --quantize nf4: smallest feasible budget ")[1].split()[0])
    assert nf4 <= least


def test_quantize_plans_qlora_and_the_plan_says_so(tiny_config, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(_plan_args(tiny_config, "0.01", "--quantize", "nf4", "--json", str(out))) == 0
    plan, printed = load_plan(out), capsys.readouterr().out
    assert {m.method for m in plan.modules if m.role != "lm_head"} == {"lora+nf4"}
    assert "lora+nf4" in printed and "quantize: 14 frozen Linear-like weights stored as NF4" in printed
    # hidden 64, intermediate 128, 2 layers: 8 weights of 64x64 and 6 of 64x128, NF4 + double quantization
    quantized = sum(m.details["quantized_bytes"] for m in plan.modules if "quantized_bytes" in m.details)
    assert quantized == 8 * (2048 + 64 + 4 + 4) + 6 * (4096 + 128 + 4 + 4)


def test_quantize_auto_keeps_the_weights_when_they_fit(tiny_config, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(_plan_args(tiny_config, "1", "--quantize", "auto", "--json", str(out))) == 0
    plan = load_plan(out)
    assert plan.notes[-1].startswith("quantize='auto' chose no quantization: unquantized fits")
    assert {m.method for m in plan.modules if m.role != "lm_head"} == {"lora"}


def test_json_dash_writes_the_plan_to_stdout_and_a_model_directory_is_a_config(tiny_config, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY))
    assert main(_plan_args(str(model_dir), "0.01", "--json", "-")) == 0
    printed = capsys.readouterr()
    plan = memopt.Plan.from_json(printed.out)  # stdout is the JSON alone
    assert plan.summary().strip() in printed.err
    (tmp_path / "empty").mkdir()
    assert main(_plan_args(str(tmp_path / "empty"), "0.01")) == EXIT_BAD_INPUT
    assert "directory without a config.json" in capsys.readouterr().err


def test_help_shows_examples_and_a_bad_method_or_optimizer_stops_before_any_model_is_built(capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        main(["plan", "--help"])
    assert done.value.code == 0 and "examples:" in capsys.readouterr().out
    import memopt.cli as cli

    monkeypatch.setattr(cli, "_meta_model", lambda *a: pytest.fail("a model was built"))
    for bad in (["--method", "dora"], ["--optimizer", "lion"]):
        with pytest.raises(SystemExit) as done:
            main(_plan_args("llama-2-7b", "24") + bad)
        assert done.value.code == EXIT_BAD_INPUT and "invalid choice" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_not_a_traceback(tiny_config, tmp_path):
    import subprocess

    out = tmp_path / "plan.json"
    assert main(_plan_args(tiny_config, "0.01", "--json", str(out))) == 0
    # `memopt inspect plan.json | head -1`: the pipe closes after one line
    script = (f"import sys; from memopt.cli import main; sys.exit(main(['inspect', {str(out)!r}]))")
    proc = subprocess.run(f"{sys.executable} -c \"{script}\" | head -1", shell=True, capture_output=True, text=True)
    assert proc.stdout.startswith("memopt plan v6") and "Traceback" not in proc.stderr and "Broken" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--hf-config", "gpt-9"], "neither a preset nor a file or directory; presets: llama-2-7b, llama-2-13b"),
    (["--device", "tpu-v9"], "unknown device 'tpu-v9'; presets: a100-40gb"),
    (["--method", "s2ft", "--rank", "8"], "--rank is for lora, paca, randlora, rso"),
    (["--method", "s2ft", "--quantize", "nf4", "--rank", "8"], "--rank is for lora, paca, randlora, rso"),
    (["--method", "lora", "--resample-every", "8"], "--resample-every is for --method rso"),
    (["--method", "full", "--rank", "8"], "full has none (the optimizer's rank is --optimizer-rank)"),
    (["--optimizer", "adamw8bit", "--optimizer-rank", "8"],
     "--optimizer-rank is not an option of --optimizer adamw8bit; optimizers that take it: apollo, apollo-mini"),
    (["--method", "full", "--quantize", "nf4"], "not nf4, whose codes cannot take an update"),
    (["--workers", "-1"], "--workers must be >= 0 (0: one per CPU core), got -1"),
    (["--time-limit", "0"], "--time-limit must be a positive number of seconds, got 0"),
])
def test_bad_input_exits_2_and_says_what_was_expected(tiny_config, capsys, args, message):
    base = {"--hf-config": tiny_config, "--device": "rtx4090", "--method": "lora", "--rank": None}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["plan", "--batch", "2", "--seq", "16", "--budget", "1", "--reserve", "0"]
    for key, value in base.items():
        argv += [key, value] if value is not None else []
    assert main(argv) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_a_file_that_is_not_a_model_config_is_refused(tmp_path, capsys):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "truncation": None}))
    assert main(_plan_args(str(path), "1")) == EXIT_BAD_INPUT
    assert "has no 'model_type'; expected a Hugging Face model config.json" in capsys.readouterr().err
    assert main(["inspect", str(path)]) == EXIT_BAD_INPUT
    assert "not a memopt plan" in capsys.readouterr().err


@pytest.mark.parametrize("preset,params", [
    ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320), ("llama-2-70b", 68_976_648_192),
    ("llama-3-8b", 8_030_261_248), ("mistral-7b", 7_248_023_552),
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.3-70b", 70_553_706_496),  # the model cards' counts
])
def test_presets_build_the_published_models_on_meta(preset, params):
    model, batch = _meta_model(_hf_config(preset), 1, 8, __import__("torch").bfloat16)
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(p.device.type == "meta" for p in model.parameters()) and batch["input_ids"].shape == (1, 8)
    assert set(HF_PRESETS) == {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "mistral-7b", "llama-3.1-8b",
                               "llama-3.3-70b"}


def test_an_unknown_quantize_format_is_refused_by_the_parser(tiny_config, capsys):
    with pytest.raises(SystemExit) as info:
        main(_plan_args(tiny_config, "1", "--quantize", "fp4"))
    assert info.value.code == EXIT_BAD_INPUT
    assert "argument --quantize: invalid choice: 'fp4'" in capsys.readouterr().err


def test_version_and_a_missing_transformers_named_with_its_extra(tiny_config, capsys, monkeypatch):
    import memopt

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"memopt {memopt.__version__}"
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    code = main(["plan", "--hf-config", str(tiny_config), "--batch", "1", "--seq", "16", "--budget", "1"])
    assert code == 2 and "pip install 'memopt[hf]'" in capsys.readouterr().err


def test_report_draws_the_plan_and_a_bad_report_path_stops_before_the_work(tiny_config, tmp_path, capsys,
                                                                          monkeypatch):
    pytest.importorskip("matplotlib")
    out, picture = tmp_path / "plan.json", tmp_path / "plan.svg"
    assert main(_plan_args(tiny_config, "0.01", "--json", str(out), "--report", str(picture))) == 0
    svg = picture.read_text()
    assert svg.startswith("<?xml") and "device memory over the step" in svg and "saved activations per layer" in svg
    assert main(["inspect", str(out), "--report", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import memopt.cli as cli

    monkeypatch.setattr(cli, "_meta_model", lambda *a: pytest.fail("a model was built"))
    for bad, message in ((tmp_path / "plan.pdf", "is .png or .svg"), (tmp_path / "no" / "plan.png", "does not exist")):
        capsys.readouterr()
        assert main(_plan_args(tiny_config, "0.01", "--report", str(bad))) == EXIT_BAD_INPUT
        assert message in capsys.readouterr().err


def test_a_json_path_in_a_missing_folder_or_a_negative_budget_stops_before_the_work(tiny_config, tmp_path, capsys,
                                                                                     monkeypatch):
    import memopt.cli as cli

    monkeypatch.setattr(cli, "_meta_model", lambda *a: pytest.fail("a model was built"))
    assert main(_plan_args(tiny_config, "0.01", "--json", str(tmp_path / "no" / "p.json"))) == EXIT_BAD_INPUT
    assert "the folder" in (err := capsys.readouterr().err) and "does not exist" in err
    assert main(_plan_args(tiny_config, "-1")) == EXIT_BAD_INPUT
    assert "--budget must be a positive number" in capsys.readouterr().err


def test_plan_takes_randlora_with_its_rank(tiny_config, capsys):
    assert main(_plan_args(tiny_config, "1", "--method", "randlora")) == 0  # --rank 4: the bases' rank
    printed = capsys.readouterr().out
    assert "method=randlora" in printed and "RandLoRA bases: A [4, 1, " in printed
    assert "randlora" in {line.split()[1] for line in printed.splitlines() if line.startswith(("0 ", "0-", "1 "))}


def test_plan_takes_rso_with_its_rank_and_subproblem_length(tiny_config, capsys):
    assert main(_plan_args(tiny_config, "1", "--method", "rso", "--resample-every", "50")) == 0  # --rank 4
    printed = capsys.readouterr().out
    assert "method=rso" in printed and "every 50 optimizer steps B·P is folded into W" in printed
    assert "rank=4, resample_every=50" in printed


def test_plan_takes_lisa_and_owlore_with_their_options(tiny_config, capsys):
    argv = _plan_args(tiny_config, "1", "--method", "owlore", "--active-layers", "1", "--switch-every", "5")
    argv.remove("--rank")
    argv.remove("4")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "method=owlore" in printed and "OwLore: 1 of " in printed and "switched every 5 optimizer steps" in printed
    assert "the outlier ratios need real weights (a dry run on meta)" in printed
    assert main(argv[:-4] + ["--method", "lora", "--active-layers", "2"]) == EXIT_BAD_INPUT
    assert "--active-layers is for --method lisa or owlore" in capsys.readouterr().err


def test_max_seq_stops_at_a_learned_position_tables_end(tmp_path, capsys):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 96,
                                "n_positions": 64}))
    argv = ["plan", "--hf-config", str(path), "--batch", "2", "--seq", "16", "--budget", "1", "--device", "rtx4090",
            "--reserve", "0", "--max-seq", "--time-limit", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "longest sequence: 64 tokens at batch 2, the model's position table's length" in captured.out
    assert "trying seq 32" in captured.err and "trying seq 128" not in captured.err
    assert "planned inputs: input_ids[2, 64]" in captured.out


@pytest.mark.slow
def test_max_seq_and_max_batch_find_the_largest_size_that_fits(tiny_config, capsys):
    argv = ["plan", "--hf-config", tiny_config, "--batch", "2", "--seq", "16", "--budget", "0.004", "--device",
            "rtx4090", "--reserve", "0", "--time-limit", "1"]
    assert main([*argv, "--max-seq"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("longest sequence:"))
    found, over = int(line.split()[2]), int(line.split("; seq ")[1].split()[0])
    assert found < over <= found + max(64, found // 16) and "fits in 0.004 GiB" in line
    assert main([*argv, "--max-batch"]) == 0
    assert "largest batch: " in capsys.readouterr().out
    assert main([*argv, "--budget", "0.0001", "--max-seq"]) == 3  # the last --budget counts: seq 16 does not fit


def test_cut_ce_fuses_the_head_and_loss_and_no_cut_ce_keeps_the_logits(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, "vocab_size": 4096}))  # the logits dominate this step
    plans = {}
    for flag in ("--cut-ce", "--no-cut-ce"):
        assert main(_plan_args(str(path), "1", flag, "--json", str(tmp_path / f"{flag}.json"))) == 0
        plans[flag] = load_plan(tmp_path / f"{flag}.json")
    capsys.readouterr()
    fused, unfused = plans["--cut-ce"], plans["--no-cut-ce"]
    assert any(n.startswith("cut cross-entropy: the LM head and the loss fused") for n in fused.notes)
    assert any("cut cross-entropy not applied: cut_cross_entropy=False" in n for n in unfused.notes)
    assert fused.min_budget_bytes < unfused.min_budget_bytes
