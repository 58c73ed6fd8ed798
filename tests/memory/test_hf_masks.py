"""HF's causal masks, planned as eager HF makes them: a batch of whole sequences (no attention_mask,
no position ids) makes no [batch, 1, T, T] mask in the plan or in the lowered step, and the step's
numbers equal the eager model's; a call with packed position ids keeps HF's own masking."""

from __future__ import annotations

import copy

import torch

from memopt.memory.hf_masks import eager_masks, unpadded
from tests.models import lm_batch, tiny_llama
from tests.runtime._planned import gradients, planned


def _batch(model, batch=2, seq=32):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def _masks(plan, batch, seq):
    return [t.name for t in plan.tensors if tuple(t.shape[-2:]) == (seq, seq) and len(t.shape) == 4]


def test_whole_sequences_plan_and_run_without_a_mask_and_equal_the_eager_step():
    model = tiny_llama(num_hidden_layers=3)
    reference = copy.deepcopy(model)
    batch = _batch(model)
    optimized = planned(model, batch, 0.3, method="full")
    assert _masks(optimized.plan, 2, 32) == []
    loss, grads = gradients(optimized, optimized.model, batch)
    ref_loss, ref_grads = gradients(reference, reference, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


def test_packed_position_ids_keep_hfs_masking_and_equal_the_eager_step():
    model = tiny_llama(num_hidden_layers=3)
    reference = copy.deepcopy(model)
    batch = _batch(model)
    batch["position_ids"] = torch.cat([torch.arange(16), torch.arange(16)]).expand(2, -1)  # two sequences a row
    optimized = planned(model, batch, 0.3, method="full")
    loss, grads = gradients(optimized, optimized.model, batch)
    # HF reads packed position ids only without a cache, as memopt's training step runs it (use_cache=False).
    ref_loss, ref_grads = gradients(lambda **b: reference(**b, use_cache=False), reference, batch)
    unmasked = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}  # same positions, not packed
    assert not torch.allclose(ref_loss, reference(**unmasked, use_cache=False).loss)  # packing masks across sequences
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


def test_a_dry_run_plans_no_mask_at_long_context():
    from memopt.api import plan_only
    from memopt.cli import _hf_config, _meta_model

    cfg = _hf_config("llama-2-7b")
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 2, 256, 512, 4
    cfg.num_key_value_heads = 4
    model, batch = _meta_model(cfg, 1, 4096, torch.bfloat16)
    plan = plan_only(model, 24, batch, "lora", device="rtx4090")
    assert _masks(plan, 1, 4096) == []


def test_only_calls_without_mask_or_position_inputs_are_changed():
    import transformers.masking_utils as mu

    model = tiny_llama()
    original = mu.find_packed_sequence_indices
    ids = torch.zeros(1, 4, dtype=torch.long)
    with eager_masks(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        assert mu.find_packed_sequence_indices is original
    with eager_masks(model, (), {"input_ids": ids}):
        assert mu.find_packed_sequence_indices is not original
        with eager_masks(model, (), {"input_ids": ids}):  # nested: restored by the outermost only
            pass
        assert mu.find_packed_sequence_indices is not original
    assert mu.find_packed_sequence_indices is original


def test_a_tokenizers_all_ones_mask_plans_no_mask_and_a_padded_batch_gets_a_plan_of_its_own():
    # The user's loader: a tokenizer's batches carry an attention_mask, all ones until a batch is padded.
    model = tiny_llama(num_hidden_layers=2)
    reference = copy.deepcopy(model)
    whole = {**_batch(model), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    padded = {**_batch(model), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    padded["attention_mask"][1, 20:] = 0
    padded["labels"] = padded["labels"].masked_fill(padded["attention_mask"] == 0, -100)
    assert unpadded(model, (), whole) is True and unpadded(model, (), padded) is False
    assert unpadded(model, (), _batch(model)) is None  # no mask: nothing to read
    optimized = planned(model, whole, 0.3, method="full")
    assert optimized.plan.unpadded_mask and _masks(optimized.plan, 2, 32) == []
    first = optimized.plan
    # The loop's first batch is padded: the plan optimize made (for whole batches) is kept for the
    # first whole batch after it, not re-planned again.
    for step, batch in enumerate((padded, whole, padded, whole)):
        loss, grads = gradients(optimized, optimized.model, batch)
        ref_loss, ref_grads = gradients(reference, reference, batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)
        assert optimized.plan.unpadded_mask == (batch is whole)
        if batch is padded:
            assert _masks(optimized.plan, 2, 32)  # the padded step's plan counts its mask
            padded_plan = optimized.plan
    # One re-plan, for the first padded batch; both plans are kept after it.
    assert len(optimized.replans) == 1 and optimized.plan is first and optimized.replans[0].startswith("a padded batch")
    assert type(padded_plan).from_json(padded_plan.to_json()).unpadded_mask is False


def test_a_mask_with_no_values_is_not_read_and_one_it_cannot_read_is_padded():
    model = tiny_llama()
    with torch.device("meta"):
        ids = torch.zeros(1, 4, dtype=torch.long)
    assert unpadded(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) is None
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert unpadded(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                "position_ids": torch.arange(4)[None]}) is None  # HF's own logic: not changed
    assert unpadded(torch.nn.Linear(2, 2), (torch.ones(2, 2),), {}) is None
    # Masks this does not read as 0/1 tokens are taken as padded (HF's own logic), never as all ones.
    assert unpadded(model, (), {"input_ids": ids, "attention_mask": torch.ones(1, 4)}) is False  # float
    assert unpadded(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                "decoder_attention_mask": torch.ones_like(ids)}) is False


def test_a_mask_is_read_once_per_call_and_again_after_an_in_place_write(monkeypatch):
    """``OptimizedModel`` and its lowered step both ask of one call's mask: one read (a device
    sync on a GPU). A write into the same tensor is read again; a new tensor is read."""
    from memopt.memory import hf_masks

    model = tiny_llama()
    batch = lm_batch(model, batch=2, seq=8)
    mask = batch["attention_mask"]
    reads = []
    real_all = torch.Tensor.all
    monkeypatch.setattr(torch.Tensor, "all", lambda self, *a, **k: reads.append(1) or real_all(self, *a, **k))
    assert hf_masks.unpadded(model, (), batch) is True
    assert hf_masks.unpadded(model, (), batch) is True
    assert len(reads) == 1
    mask[0, :3] = 0
    assert hf_masks.unpadded(model, (), batch) is False and len(reads) == 2
    batch["attention_mask"] = torch.ones_like(mask)
    assert hf_masks.unpadded(model, (), batch) is True and len(reads) == 3


def test_a_shorter_padded_batch_after_an_example_without_a_mask_is_planned_with_its_mask_and_exact():
    """The example had no attention_mask; the loop's next batch is shorter and padded. It is
    re-planned before it runs, and says why; the re-plan widens the ids to the planned length and
    the mask alike (before, the mask kept the call's length and the trace of the widened step
    failed: "Attempting to broadcast a dimension")."""
    model = tiny_llama(num_hidden_layers=2)
    reference = copy.deepcopy(model)
    optimized = planned(model, _batch(model), 0.3, method="full")
    assert optimized.plan.needs_runtime
    short = {**_batch(model, seq=24), "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    short["attention_mask"][0, :5] = 0
    short["labels"] = short["labels"].masked_fill(short["attention_mask"] == 0, -100)
    loss, grads = gradients(optimized, optimized.model, short)
    ref_loss, ref_grads = gradients(reference, reference, short)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)
    assert optimized.replans[0].startswith("a padded batch") and "planned without an attention_mask" in \
        optimized.replans[0]
    assert dict(optimized.plan.input_shapes)["attention_mask"] == (2, 32)
