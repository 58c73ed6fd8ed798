"""An optimized model drops into HF Trainer unchanged: columns, loss, optimizer, saving."""

from __future__ import annotations

import pytest
import torch

import memopt
from tests.models import lm_batch, tiny_llama
from tests.runtime._planned import budget_between

transformers = pytest.importorskip("transformers")


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
        for row in self.rows:
            row["unused_column"] = "dropped by Trainer because forward does not take it"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


# recomputing under Trainer also runs in test_checkpoints_hold_only_the_trained_tensors_... (kept in make test)
@pytest.mark.parametrize("planned", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["as-is", "recomputing"])
def test_trainer_trains_only_the_adapters_and_the_loss_falls(tmp_path, planned):
    model = tiny_llama()
    batch = lm_batch(model, batch=4, seq=16)
    options = dict(rank=8, alpha=16, device="cpu")
    budget = budget_between(model, batch, 0.3, **options) if planned else 1
    optimized = memopt.optimize(model, budget_gb=budget, example_inputs=batch, **options)
    assert (optimized.runtime is not None) == planned  # recomputing: every step runs the lowered plan
    frozen = {n: p.detach().clone() for n, p in optimized.named_parameters() if not p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
    )
    trainer = transformers.Trainer(model=optimized, args=args, train_dataset=_Batches(batch))
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert result.global_step == 12
    for name, p in optimized.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    trainer.save_model(str(tmp_path / "saved"))
    assert any((tmp_path / "saved").iterdir())


@pytest.mark.slow  # a costly scenario: make test-all
def test_checkpoints_hold_only_the_trained_tensors_and_resume_to_the_same_losses(tmp_path):
    from memopt.integrations.hf import Trainer

    def run(out, steps, resume=None):
        model = tiny_llama()
        batch = lm_batch(model, batch=4, seq=16)
        optimized = memopt.optimize(model, budget_gb=budget_between(model, batch, 0.3, device="cpu"),
                                    example_inputs=batch, device="cpu")
        args = transformers.TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2,
            logging_steps=1, report_to=[], use_cpu=True, save_strategy="steps", save_steps=3, seed=0,
        )
        trainer = Trainer(model=optimized, args=args, train_dataset=_Batches(batch))
        trainer.train(resume_from_checkpoint=resume)
        return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}, optimized

    straight, optimized = run(tmp_path / "a", 6)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert "memopt_config.json" in files and "model.safetensors" not in files
    weights = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    trainable = sum(p.numel() * p.element_size() for p in optimized.parameters() if p.requires_grad)
    assert weights < trainable + 64 * 1024  # the adapters (plus safetensors' header), no frozen weight
    resumed, _ = run(tmp_path / "a", 6, resume=str(checkpoint))
    assert resumed.keys() == straight.keys() == {1, 2, 3, 4, 5, 6}  # steps 1-3 from the checkpoint's state
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], rel=1e-6)
    assert len(set(straight.values())) > 1


@pytest.mark.slow
def test_trainer_takes_the_optimizer_the_plan_counted_for_full_training(tmp_path):
    model = tiny_llama()
    batch = lm_batch(model, batch=4, seq=16)
    optimized = memopt.optimize(model, 1, batch, method="full", optimizer="galore-adamw8bit",
                                optimizer_options={"rank": 8, "update_proj_gap": 4}, device="cpu")
    opt = optimized.make_optimizer(lr=1e-2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
    )
    trainer = transformers.Trainer(model=optimized, args=args, train_dataset=_Batches(batch), optimizers=(opt, None))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert trainer.optimizer.optimizer is opt if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer is opt
    assert len(losses) == 8 and losses[-1] < losses[0]
    # the scheduler Trainer built drove the counted optimizer's lr
    assert opt.param_groups[0]["lr"] != 1e-2
