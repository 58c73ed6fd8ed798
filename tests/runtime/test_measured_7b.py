"""The LLaMA-2-7B shape (bf16, LoRA r=16, AdamW, batch 1 x 512) planned for an RTX 4090 at 14.5 GiB:
the simulated step of the returned model peaks at exactly the prediction, inside the budget.

Built on ``meta``; the step runs on fake CPU tensors standing in for the GPU, with the plan's
offloads simulated by the lowering's own copy ops (the host bytes are checked against the plan).
"""

import pytest
import torch

import memopt
from memopt.memory.simulate import simulate_step
from memopt.optim import factory as optim_factory
from tests.memory.test_simulate_7b import _llama2_7b

GIB = 2**30
BUDGET_GB = 14.5  # keeping every activation needs 15.57 GiB of the 4090's 24; 14.5 forces decisions (the optimizer step: 13.30 GiB + the 0.75 GiB reserve)


@pytest.mark.slow
def test_llama2_7b_plan_is_what_the_simulated_step_measures():
    ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    batch = {"input_ids": ids, "labels": ids.clone()}
    optimized = memopt.optimize(_llama2_7b(), budget_gb=BUDGET_GB, example_inputs=batch, method="lora",
                                device="rtx4090", rank=16)
    plan = optimized.plan
    actions = plan.bytes_by_action()
    assert plan.memory.peak_bytes > plan.usable_bytes  # keeping everything would not fit
    assert actions["recompute"] > 0 and actions["offload"] > 0 and optimized.applied.covers(plan)
    measured = simulate_step(optimized, batch, optimizer=optim_factory("adamw"), device="cuda", round_to=512).peak_bytes
    print(f"7B: budget {plan.budget_bytes / GIB:.3f} GiB (usable {plan.usable_bytes / GIB:.3f}), predicted "
          f"{plan.predicted_peak_bytes / GIB:.3f}, measured {measured / GIB:.3f} GiB")
    assert measured == plan.predicted_peak_bytes <= plan.usable_bytes
    report = optimized.runtime.reports[-1]
    # One host copy per offloaded storage, of its raw bytes (the plan counts device blocks of 512 bytes).
    assert actions["offload"] - 512 * len(report.offloaded) < report.host_bytes <= actions["offload"]
    assert report.recompute_flops == plan.recompute_flops
