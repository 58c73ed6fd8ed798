"""Layerwise sampling (LISA, OwLore): what trains at the plan, blocks switched by the optimizer from
make_optimizer on optimizer steps (gradient accumulation too), the state of blocks frozen again
freed (memory over three rotations), blocks activated later trained, the schedule resumed from the
optimizer's state_dict, OwLore's outlier-weighted draw, and the bad inputs it refuses."""

from __future__ import annotations

import copy

import pytest
import torch

import memopt
from memopt.passes.layerwise import LayerwiseDetails, outlier_ratios, sampler_of
from tests.models import lm_batch, tiny_llama


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=3)
    return model, lm_batch(model, batch=2, seq=16)


def _lisa(base, **options):
    model, batch = base
    options = {"active_layers": 1, "switch_every": 2, "seed": 3, **options}
    return memopt.optimize(copy.deepcopy(model), 1, batch, method=options.pop("method", "lisa"), device="cpu", **options)


def _block_params(optimized):
    sampler = sampler_of(optimized.model)
    return sampler, sampler.blocks


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def test_the_plan_trains_the_embeddings_head_and_the_costliest_active_set(base):
    optimized = _lisa(base)
    sampler, blocks = _block_params(optimized)
    last = len(blocks) - 1
    # planned for the first and the last block active; the model is left in the costlier
    note = next(n for n in optimized.plan.notes if n.startswith("planned for"))
    assert "the costliest of the 2 states planned" in note
    assert f"model.layers.{last} active" in note and "model.layers.0 active" in note
    chosen = sampler.active
    assert chosen in ((0,), (last,)) and note.startswith(f"planned for model.layers.{chosen[0]} active")
    trainable = {n for n, p in optimized.model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in trainable and "lm_head.weight" in trainable
    assert all(f"model.layers.{chosen[0]}." in n for n in trainable - {"model.embed_tokens.weight", "lm_head.weight"})
    assert optimized.plan.trainable_params == sum(p.numel() for p in optimized.parameters() if p.requires_grad)
    sampled = [d for d in optimized.plan.modules if d.method == "lisa"]
    assert sampled and all(isinstance(d.details, LayerwiseDetails) for d in sampled)
    assert all(d.details["probability"] == pytest.approx(1 / len(blocks)) for d in sampled)
    assert any("LISA: 1 of 3 blocks" in note and "drawn uniformly" in note for note in optimized.plan.notes)


def test_three_rotations_free_the_state_of_blocks_frozen_again(base):
    model, batch = base
    optimized = _lisa(base)
    opt = optimized.make_optimizer(lr=1e-2)
    sampler, blocks = _block_params(optimized)
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for params in blocks for p in params)  # every block, active or not
    before = {i: [p.detach().clone() for p in params] for i, params in enumerate(blocks)}
    per_switch, active_sets, peak = [], [sampler.active], 0
    for step in range(1, 7):  # switch every 2 steps: three rotations
        optimized(**batch).loss.backward()
        opt.step()
        peak = max(peak, _state_bytes(opt))
        opt.zero_grad()
        if step % 2 == 0:
            per_switch.append(_state_bytes(opt))
            active_sets.append(sampler.active)
            frozen = [p for i, params in enumerate(blocks) if i not in sampler.active for p in params]
            assert all(p not in opt.state and p.grad is None and not p.requires_grad for p in frozen)
    embed_head = sum(2 * p.numel() * 4 + 4 for p in sampler.always)  # two fp32 moments and a step each
    one_block = sum(2 * p.numel() * 4 + 4 for p in blocks[0])
    assert peak == embed_head + one_block  # never more than one block's state: memory does not grow
    for (was, now), after in zip(zip(active_sets, active_sets[1:]), per_switch):
        # after a switch: the embeddings' and head's state, and the block's if it was drawn again
        assert after == embed_head + (one_block if was == now else 0)
    assert len(set(active_sets)) > 1
    # the blocks drawn trained (those activated after the optimizer was built too); the others did not move
    trained = {i for i, params in enumerate(blocks) if not all(torch.equal(a, p) for a, p in zip(before[i], params))}
    assert trained == {i for s in active_sets[:-1] for i in s}


def test_the_schedule_counts_optimizer_steps_not_backwards(base):
    model, batch = base
    optimized = _lisa(base, switch_every=3)
    opt = optimized.make_optimizer(lr=1e-2)
    sampler, _ = _block_params(optimized)
    for _ in range(2):  # two micro-batches per optimizer step
        for _ in range(2):
            optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert sampler.step == 2 and sampler.active == sampler.draw(0)
    for _ in range(2):
        optimized(**batch).loss.backward()
    opt.step()
    assert sampler.step == 3 and sampler.active == sampler.draw(1)


def test_a_resumed_optimizer_switches_when_the_original_would(base):
    optimized = _lisa(base, switch_every=2)
    model, batch = base
    opt = optimized.make_optimizer(lr=1e-2)
    for _ in range(3):
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())
    assert state["memopt_layerwise"]["step"] == 3 and len(state["memopt_layerwise"]["probabilities"]) == 3
    other = _lisa(base, switch_every=2)
    opt2 = other.make_optimizer(lr=1e-2)
    opt2.load_state_dict(state)
    sampler = sampler_of(other.model)
    assert sampler.step == 3 and sampler.active == sampler_of(optimized.model).active


def test_owlore_draws_blocks_by_their_outlier_ratio(base):
    model, batch = base
    planted = copy.deepcopy(model)
    with torch.no_grad():  # block 0's up_proj gets a few huge weights: Wanda outliers
        planted.model.layers[0].mlp.up_proj.weight[:4, :4] *= 1000
    optimized = memopt.optimize(planted, 1, batch, method="owlore", active_layers=1, switch_every=1, device="cpu")
    sampler = sampler_of(optimized.model)
    assert sampler.probabilities[0] > 0.97  # the others have no outliers: 1 % of its ratio each
    assert sum(sampler.draw(k) == (0,) for k in range(100)) >= 90
    note = next(n for n in optimized.plan.notes if n.startswith("OwLore"))
    assert "drawn by outlier ratio (M = 13)" in note
    # the ratio itself: the fraction of |W_ij|·‖X_j‖ above 13 × the mean, on the block's layers
    from memopt.ir.structure import build_model_graph

    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain.model.layers[0].mlp.up_proj.weight[:4, :4] *= 1000
    ratios = outlier_ratios(plain, build_model_graph(plain, (), batch), 13.0)
    total = sum(m.weight.numel() for m in plain.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert ratios[1] == 0.0 and 8 / total <= ratios[0] <= 32 / total  # about the 16 planted


def test_owlore_plans_with_galore_and_a_dry_run_on_meta_says_the_ratios_wait(base):
    from memopt.api import plan_only

    model, batch = base
    with torch.device("meta"):
        meta = tiny_llama(num_hidden_layers=3)
    plan = plan_only(meta, 1, batch, "owlore", device="cpu", optimizer="galore-adamw", optimizer_options={"rank": 4},
                     active_layers=1)
    note = next(n for n in plan.notes if n.startswith("OwLore"))
    assert "uniformly for now: the outlier ratios need real weights" in note
    assert plan.optimizer == "galore-adamw"


def test_bad_input(base):
    model, batch = base
    with pytest.raises(ValueError, match=r"active_layers=9 is above the 3 blocks of LlamaForCausalLM; pass 1 <= "
                                         r"active_layers <= 3"):
        memopt.optimize(copy.deepcopy(model), 1, batch, method="lisa", active_layers=9, device="cpu")
    with pytest.raises(ValueError, match="switch_every must be a positive integer"):
        memopt.LisaConfig(switch_every=0)
    with pytest.raises(ValueError, match="outlier_threshold must be a positive number"):
        memopt.OwloreConfig(outlier_threshold=-1)
    with pytest.raises(ValueError, match="LISA trains whole blocks' weights, which quantized weights"):
        memopt.optimize(copy.deepcopy(model), 1, batch, method="lisa", quantize="nf4", device="cpu")


@pytest.mark.slow
def test_updates_inside_backward_follow_the_blocks_drawn(base):
    model, batch = base
    options = {"method": "lisa", "active_layers": 1, "switch_every": 1, "seed": 3, "device": "cpu", "reserve_gb": 0}
    loose = memopt.optimize(copy.deepcopy(model), 1, batch, **options)
    with pytest.raises(memopt.InfeasibleBudgetError) as info:
        memopt.optimize(copy.deepcopy(model), 1e-6, batch, planner=memopt.PlannerConfig(allow_update_in_backward=False),
                        **options)
    # just below what holding the gradients needs: updates inside backward, with room for the other active sets
    budget = info.value.min_budget_bytes - loose.plan.static.gradients // 8
    optimized = memopt.optimize(copy.deepcopy(model), budget / 2**30, batch, **options)
    assert optimized.plan.update_in_backward
    note = next(n for n in optimized.plan.notes if n.startswith("planned for"))
    assert note.startswith("planned for every active set at once") and optimized.plan.traced_trainable
    opt = optimized.make_optimizer(lr=1e-2)
    sampler, blocks = _block_params(optimized)
    drawn = set()
    for _ in range(4):
        drawn.add(sampler.active)
        active = sampler.active
        before = [[p.detach().clone() for p in params] for params in blocks]
        optimized(**batch).loss.backward()
        assert all(p.grad is None for p in optimized.parameters())  # each updated and freed inside backward
        opt.step()
        for i, params in enumerate(blocks):
            moved = not all(torch.equal(a, p) for a, p in zip(before[i], params))
            assert moved == (i in active), (i, active)
    # one traced step for every set drawn: the updates of the frozen blocks are pruned, not re-traced
    assert len(drawn) > 1 and optimized.runtime.traces_made == 1 and optimized.replans == []


def test_save_reload_keeps_every_block_trained_so_far(base, tmp_path):
    model, batch = base
    optimized = _lisa(base, switch_every=1)
    opt = optimized.make_optimizer(lr=1e-2)
    for _ in range(4):  # several blocks drawn, most frozen again by now
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = optimized(**batch).logits
    changed = [n for (n, p), q in zip(optimized.model.named_parameters(), model.parameters()) if not torch.equal(p, q)]
    assert any(not p.requires_grad for n, p in optimized.model.named_parameters() if n in changed)
    optimized.save_pretrained(tmp_path)
    reloaded = memopt.from_pretrained(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)
    merged = optimized.merge(inplace=False)
    with torch.no_grad():
        assert torch.equal(merged(**batch).logits, trained)


def test_owlore_fills_a_draw_from_blocks_without_outliers_at_random():
    from memopt.passes.layerwise import draw_probabilities

    p = draw_probabilities([0.0, 0.0, 0.0, 0.02], 4, 2)
    assert p[3] > 0.97 and torch.all(p[:3] > 0) and torch.allclose(p[:3], p[0].expand(3))
    assert torch.equal(draw_probabilities([0.0] * 3, 3, 1), torch.full((3,), 1 / 3))
    assert torch.equal(draw_probabilities(None, 2, 1), torch.full((2,), 0.5))
    from memopt.passes.layerwise import LayerSampler

    sampler = LayerSampler([(str(i), []) for i in range(4)], [], p, memopt.OwloreConfig(active_layers=2))
    draws = {sampler.draw(k) for k in range(20)}
    assert all(3 in d for d in draws) and len(draws) > 1


def test_disable_adapter_is_refused(base):
    optimized = _lisa(base)
    with pytest.raises(memopt.MemoptError, match="lisa trains the weights themselves, so there is no adapter"):
        with optimized.disable_adapter():
            pass


@pytest.fixture(scope="module")
def lowered():
    """LISA (1 of 4 blocks, a switch every step) at a budget that needs recomputation: the step is
    planned once for every active set; the user's loop beside the same model run as it is."""
    from tests.runtime._planned import budget_between

    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=4)
    batch = lm_batch(model, batch=2, seq=64)
    options = {"method": "lisa", "active_layers": 1, "switch_every": 1, "seed": 3, "device": "cpu", "reserve_gb": 0,
               "cut_cross_entropy": False}
    optimized = memopt.optimize(copy.deepcopy(model), budget_between(model, batch, 0.3, **options), batch, **options)
    return optimized, batch


def test_a_lowered_step_switches_blocks_without_a_re_plan_or_re_trace(lowered):
    """Every set drawn runs the one traced step, its backward pruned to the active blocks: the
    gradients equal the model's own eager step with the same blocks trainable (bit for bit), the
    frozen blocks get none, and the tracker's peak of each step is at most the plan's (equal for the
    worst-case set, whose gradients are made first), inside the budget."""
    from memopt.memory.tracker import MemoryTracker

    optimized, batch = lowered
    plan = optimized.plan
    assert plan.needs_runtime and plan.bytes_by_action()["recompute"] > 0
    assert plan.traced_trainable and any(n.startswith("planned for every active set at once") for n in plan.notes)
    assert memopt.Plan.from_json(plan.to_json()).traced_trainable == plan.traced_trainable
    sampler = sampler_of(optimized.model)
    reference = copy.deepcopy(optimized.model)  # the model as it is, run eagerly
    opt = optimized.make_optimizer(lr=1e-3)
    peaks: dict[tuple[int, ...], int] = {}
    for _ in range(6):
        active = sampler.active
        for p, q in zip(optimized.model.parameters(), reference.parameters()):
            q.data.copy_(p.data)
            q.requires_grad_(p.requires_grad)
            q.grad = None
        with MemoryTracker(optimized, opt, inputs=batch) as tracker:
            optimized(**batch).loss.backward()
            got = [None if p.grad is None else p.grad.clone() for p in optimized.model.parameters()]
            opt.step()
            opt.zero_grad(set_to_none=True)
        reference(**batch).loss.backward()
        for (name, q), g in zip(reference.named_parameters(), got):
            assert (g is None) == (q.grad is None), name
            assert g is None or torch.equal(g, q.grad), name
        peaks[active] = max(peaks.get(active, 0), tracker.report("cpu").peak_bytes)
    assert len(peaks) > 2 and optimized.runtime.traces_made == 1 and optimized.replans == []
    assert max(peaks.values()) <= plan.predicted_peak_bytes <= plan.usable_bytes
    sampler.activate(sampler.worst_case, opt)
    sampler.switch_every = 10**9
    for _ in range(2):  # a steady-state step of the worst-case set (its optimizer state made by the first)
        with MemoryTracker(optimized, opt, inputs=batch) as tracker:
            optimized(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert tracker.report("cpu").peak_bytes == plan.predicted_peak_bytes


def test_a_longer_batch_re_plans_for_every_active_set_again(lowered):
    optimized, batch = lowered
    longer = lm_batch(optimized.model, batch=2, seq=80)
    opt = optimized.make_optimizer(lr=1e-3)
    sampler = sampler_of(optimized.model)
    sampler.switch_every = 1  # as planned (the test above held a set)
    replans = len(optimized.replans)
    drawn = set()
    for _ in range(3):
        drawn.add(sampler.active)
        optimized(**longer).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert len(optimized.replans) == replans + 1 and "larger than planned" in optimized.replans[-1]
    assert len(drawn) > 1 and optimized.plan.traced_trainable  # the new plan covers every set: no re-plan at a switch
    assert optimized.plan.input_shapes["input_ids"] == (2, 80)


def test_a_deep_copy_and_a_second_forward_get_their_own_gradients(lowered):
    """The traced step is shared by a deep copy, and one model may run two forwards before either
    backward: each call's backward leaves out the gradients frozen at *its* forward."""
    optimized, batch = lowered
    sampler = sampler_of(optimized.model)
    optimized(**batch).loss.backward()  # the original's last forward: its active set
    twin = copy.deepcopy(optimized)
    twin_sampler = sampler_of(twin.model)
    for block in range(len(twin_sampler.blocks)):
        twin_sampler.activate((block,))
        for p in twin.model.parameters():
            p.grad = None
        twin(**batch).loss.backward()
        for i, params in enumerate(twin_sampler.blocks):
            assert all((p.grad is not None) == (i == block) for p in params), (block, i)
    # two forwards (embeddings trainable, then frozen by hand), the first one's backward last
    embeddings = optimized.model.get_input_embeddings().weight
    sampler.activate(sampler.worst_case)
    embeddings.grad = None
    first = optimized(**batch).loss
    embeddings.requires_grad_(False)
    second = optimized(**batch).loss
    embeddings.requires_grad_(True)
    second.backward()
    assert embeddings.grad is None
    first.backward()
    assert embeddings.grad is not None


def test_more_blocks_unfrozen_by_hand_than_planned_is_refused(lowered):
    optimized, batch = lowered
    sampler = sampler_of(optimized.model)
    for params in sampler.blocks:
        for p in params:
            p.requires_grad_(True)
    try:
        with pytest.raises(memopt.PlanMismatchError, match="active_layers=1"):
            optimized(**batch)
    finally:
        sampler.activate(sampler.worst_case)
