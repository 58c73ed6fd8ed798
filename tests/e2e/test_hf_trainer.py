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


@pytest.mark.parametrize("planned", [False, True], ids=["as-is", "recomputing"])
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
