"""The planning problem: what each choice does to the bytes at every point, and the hard rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from memopt.config import LoraConfig
from memopt.ir.joint import trace_joint
from memopt.ir.structure import build_model_graph
from memopt.passes import RewriteLog, get_pass
from memopt.planner.costmodel import DEVICE_PRESETS
from memopt.planner.problem import (
    Choice,
    build_problem,
    evaluate,
    keep_all,
    lowered_exposure,
    step_peak,
    with_optimizer_peak,
)
from memopt.planner.reference import _resident
from tests.models import lm_batch, tiny_llama
from tests.planner._synthetic import chain_trace

RTX = DEVICE_PRESETS["rtx4090"]


def _diff(problem, choices) -> list[int]:
    base = evaluate(problem, keep_all(problem)).memory
    return [a - b for a, b in zip(evaluate(problem, choices).memory, base)]


def test_recompute_frees_a_tensor_between_its_last_forward_use_and_its_recompute_point():
    problem = build_problem(chain_trace(6, 3), RTX)
    c = next(c for c in problem.candidates if "recompute" in c.allowed and c.first_backward - c.last_forward > 2)
    choices = list(keep_all(problem))
    choices[c.index] = Choice("recompute", c.first_backward)
    expected = [(-c.nbytes if c.last_forward < p < c.first_backward else 0)
                + (c.recompute_bytes if p == c.first_backward else 0) for p in range(problem.num_points)]
    assert _diff(problem, choices) == expected
    result = evaluate(problem, choices)
    assert result.recompute_us == c.recompute_us and result.exposed_transfer_us == 0


def test_the_lowered_steps_exposed_copy_time_is_its_schedule_on_one_stream():
    """Two offloads on 8 ops of 10 us (4 forward), each copy 25 us, by hand: A made at op 0 (last read
    at 1, its copy done by op 2), B at op 1 (read there only, done by 3); A is due back at op 7, B at
    op 5. Forward: A's copy runs 10-35, B's queues behind it, 35-60; A's wait after op 2 (at 30)
    stalls 5, B's after op 3 (at 45) 15. Backward: at op 5 (70) B's copy back is issued and A's one
    ahead of it: 70-95, 95-120; waiting for B stalls 25; at op 7 (115) A's stalls 5. 50 us in all."""
    problem = build_problem(chain_trace(6, 3), RTX)
    a, b = problem.candidates[:2]
    a = dataclasses.replace(a, index=0, define=0, last_forward=1, ready=2, ready_key="a", transfer_us=25)
    b = dataclasses.replace(b, index=1, define=1, last_forward=1, ready=3, ready_key="b", transfer_us=25)
    small = dataclasses.replace(problem, candidates=(a, b), num_points=8, num_forward=4, point_us=(10,) * 8)
    choices = (Choice("offload", 7), Choice("offload", 5))
    assert lowered_exposure(small, choices) == 50
    # Waited for after its last forward use instead (no ready op: the copy finishes later than
    # counted), A stalls the forward at op 1 (20 -> 35) and B's copy (35-60) at op 1 too: 40 + 25 + 5.
    unready = (dataclasses.replace(a, ready_key=None), dataclasses.replace(b, ready_key=None))
    assert lowered_exposure(dataclasses.replace(small, candidates=unready), choices) == 70
    assert lowered_exposure(small, (Choice("keep"), Choice("keep"))) == 0


def test_offload_frees_a_tensor_from_its_copy_out_until_its_prefetch():
    problem = build_problem(chain_trace(6, 3), RTX)
    c = max(problem.candidates, key=lambda c: c.fetch_start - c.ready)
    choices = list(keep_all(problem))
    choices[c.index] = Choice("offload", c.first_backward)
    gone_from, back_at = max(c.last_forward, c.ready), c.fetch_start
    assert back_at - gone_from > 1
    assert _diff(problem, choices) == [-c.nbytes if gone_from < p < back_at else 0 for p in range(problem.num_points)]


def test_evaluate_agrees_with_the_reference_residency_for_every_single_choice():
    problem = build_problem(chain_trace(8, 7), RTX)
    for c in problem.candidates:
        options = [Choice("recompute", m) for m in c.points if "recompute" in c.allowed] + [Choice("offload", c.first_backward)]
        for choice in options:
            choices = list(keep_all(problem))
            choices[c.index] = choice
            memory = evaluate(problem, choices).memory
            for p in (c.define, c.last_forward + 1, c.ready + 1, c.fetch_start, choice.point, c.last_backward):
                others = sum(o.nbytes for o in problem.candidates if o is not c and o.define <= p <= o.last_backward)
                spike = c.recompute_bytes if choice.action == "recompute" and p == choice.point else 0
                mine = c.nbytes if _resident(problem, c, choice, p) else 0
                assert memory[p] == problem.static.resident + problem.base[p] + others + mine + spike


def test_a_recomputation_needs_its_inputs_on_device():
    problem = build_problem(chain_trace(6, 3), RTX)
    t = next(c for c in problem.candidates if c.deps and "recompute" in c.allowed)
    d = problem.candidates[t.deps[0]]
    choices = list(keep_all(problem))
    choices[t.index] = Choice("recompute", t.first_backward)
    choices[d.index] = Choice("recompute", d.first_backward)  # too late if d is needed earlier
    result = evaluate(problem, choices)
    assert (not result.valid) == (d.first_backward > t.first_backward)
    early = max(p for p in d.points if p <= t.first_backward)
    choices[d.index] = Choice("recompute", early)
    assert evaluate(problem, choices).valid


def test_rng_ops_are_never_recomputed_unless_replay_is_allowed():
    trace = chain_trace(6, 3, saved_share=1.0, rng_op=2)
    problem = build_problem(trace, RTX)
    tainted = [c for c in problem.candidates if 2 in c.closure]
    assert [c.name for c in tainted] == ["f2"]  # every op's output is saved: only f2 re-runs f2
    assert "recompute" not in tainted[0].allowed and "random numbers" in tainted[0].reasons["recompute"]
    assert "recompute" in build_problem(trace, RTX, allow_rng_recompute=True).candidates[2].allowed


def test_the_cpu_has_no_offload_and_switches_remove_options():
    problem = build_problem(chain_trace(6, 3), DEVICE_PRESETS["cpu"])
    assert all(c.allowed == {"keep", "recompute"} and "no host link" in c.reasons["offload"] for c in problem.candidates)
    off = build_problem(chain_trace(6, 3), RTX, allow_recompute=False, allow_offload=False)
    assert all(c.allowed == {"keep"} for c in off.candidates)


@pytest.fixture(scope="module")
def llama3():
    model = tiny_llama(num_hidden_layers=3)
    batch = lm_batch(model)
    del batch["attention_mask"]
    get_pass("lora").apply(model, build_model_graph(model, (), batch), LoraConfig(rank=4, dropout=0.1),
                           RewriteLog(model))
    return build_problem(trace_joint(model, batch, device="cuda", granularity=512), RTX)


def test_identical_blocks_share_decision_classes(llama3):
    problem = llama3
    per_block = {b: [c for c in problem.candidates if c.block == b] for b in (0, 1, 2)}
    # block 0 does not pass a gradient to the (frozen) embedding, so it saves less than 1 and 2
    assert len(per_block[0]) < len(per_block[1]) == len(per_block[2])
    for c1, c2 in zip(per_block[1], per_block[2]):
        assert c1.klass == c2.klass and c1.nbytes == c2.nbytes and problem.class_blocks[c1.klass] == (1, 2)
    assert not {c.klass for c in per_block[0]} & {c.klass for c in per_block[1]}


def test_lora_dropout_makes_its_dependents_keep_or_offload_only(llama3):
    problem = llama3
    blocked = [c for c in problem.candidates if "recompute" not in c.allowed and not c.extra]
    assert blocked and all("random numbers" in c.reasons["recompute"] for c in blocked)
    assert all(c.module.endswith(("lora_A", "lora_dropout")) for c in blocked)
    assert all("offload" in c.allowed for c in blocked)


def test_a_simulated_optimizer_peak_replaces_the_traced_one(llama3):
    problem = with_optimizer_peak(llama3, 9 * 10**6)
    assert problem.static.optimizer_phase_peak == 9 * 10**6
    assert evaluate(problem, keep_all(problem)).memory == evaluate(llama3, keep_all(llama3)).memory
    assert with_optimizer_peak(llama3, None) is llama3


def test_the_step_peak_of_a_trace_is_keep_all_with_every_storage_to_its_last_reader():
    trace = chain_trace(6, 3)
    problem = build_problem(trace, RTX)
    peak, point = step_peak(trace)
    assert peak == evaluate(problem, keep_all(problem)).peak_bytes
    assert 0 <= point < trace.num_points


def test_a_recompute_source_may_be_offloaded_off_device_from_its_copy_until_its_first_recomputation(llama3):
    """The residual stream a block is re-run from (Unsloth's offloaded checkpoints): saved on the
    host, back on device for the earliest point a dependent may be recomputed."""
    from memopt.planner.greedy import whole_blocks_plan, with_sources_offloaded

    problem = llama3
    sources = [c for c in problem.candidates if c.extra]
    assert sources and all("offload" in c.allowed for c in sources)
    whole = whole_blocks_plan(problem)
    saved = [c for c in sources if whole[c.index].action == "keep"]
    assert saved
    offloaded = with_sources_offloaded(problem, whole)
    assert [c.index for c in problem.candidates if offloaded[c.index] != whole[c.index]] == [c.index for c in saved]
    assert all(offloaded[c.index] == Choice("offload", c.first_backward) and c.first_backward in c.points
               for c in saved)
    result = evaluate(problem, offloaded)
    assert result.valid and result.peak_bytes <= evaluate(problem, whole).peak_bytes
    diff = [a - b for a, b in zip(result.memory, evaluate(problem, whole).memory)]
    expected = [-sum(c.nbytes for c in saved if max(c.last_forward, c.ready) < p < c.fetch_start)
                for p in range(problem.num_points)]
    assert diff == expected and min(expected) < 0
    # The host budget bounds them: none fits in fewer bytes than the smallest source.
    tight = dataclasses.replace(problem, host_capacity=min(c.nbytes for c in saved) - 1)
    assert with_sources_offloaded(tight, whole) == whole


def _chunked_lora_problem():
    """bf16 LoRA layers with MLPs in pieces: they save the residual stream a block re-runs from."""
    from memopt.passes import seq_chunk

    model = tiny_llama(num_hidden_layers=6).to(torch.bfloat16)
    batch = lm_batch(model)
    del batch["attention_mask"]
    log = RewriteLog(model)
    get_pass("lora").apply(model, build_model_graph(model, (), batch), LoraConfig(rank=4), log)
    seq_chunk.install(model, 4, log)
    return build_problem(trace_joint(model, batch, device="cuda", granularity=512), RTX)


def test_the_residual_streams_checkpoints_are_offloaded_whole_classes_lowest_peak_first():
    """bf16 layers with MLPs in pieces save the residual stream a block re-runs from. The last
    block's output, in the same class, is read by no recomputation (dropped): the class is still
    offloaded, all of it (before, it stayed on device: Llama-3.3-70B at 137,216 tokens started its
    minimum-peak phase at 249.7 GiB, not 90.0). Under a host budget, the class whose offload leaves
    the lowest peak goes first."""
    from memopt.planner.greedy import _sources_moved, whole_blocks_plan, with_sources_offloaded
    from memopt.planner.problem import offloaded_bytes

    problem = _chunked_lora_problem()
    whole = whole_blocks_plan(problem)
    saved = [g for g in problem.classes.values() if g[0].extra and any(whole[c.index].action == "keep" for c in g)]
    mixed = [g for g in saved if {whole[c.index].action for c in g} == {"keep", "drop"}]
    assert len(mixed) == 1 and len(mixed[0]) == 5  # blocks 1-5's outputs; block 5's read by no recomputation
    offloaded = with_sources_offloaded(problem, whole)
    assert all(offloaded[c.index] == Choice("offload", c.first_backward) for g in saved for c in g)
    result = evaluate(problem, offloaded)
    assert result.valid and result.peak_bytes < evaluate(problem, whole).peak_bytes
    for room in sorted({sum(c.nbytes for c in g) for g in saved}):
        tight = dataclasses.replace(problem, host_capacity=room)
        chosen = with_sources_offloaded(tight, whole)
        assert offloaded_bytes(tight, chosen) <= room and evaluate(tight, chosen).valid
        alone = [evaluate(tight, _sources_moved(whole, g)).peak_bytes for g in saved if sum(c.nbytes for c in g) <= room]
        assert evaluate(tight, chosen).peak_bytes <= min(alone)
    # Where the first class in forward order is not the one that lowers the peak most:
    problem = build_problem(chain_trace(12, 9, blocks=3), RTX, allow_offload=True, host_capacity=927_744)
    whole = whole_blocks_plan(problem)
    first = next(g for g in problem.classes.values() if g[0].extra and whole[g[0].index].action == "keep"
                 and sum(c.nbytes for c in g) <= problem.host_capacity)
    chosen = evaluate(problem, with_sources_offloaded(problem, whole))
    assert chosen.valid and chosen.peak_bytes < evaluate(problem, _sources_moved(whole, first)).peak_bytes
    # The second start (the order this replaced): classes saved whole, the first that fits in forward order.
    forward = with_sources_offloaded(problem, whole, "forward")
    assert evaluate(problem, forward).valid and forward == tuple(_sources_moved(whole, first))
    # First fit, not first only: a class too large for what is left is passed over for a later one.
    sizes = {k: sum(c.nbytes for c in g) for k, g in problem.classes.items()
             if g[0].extra and whole[g[0].index].action == "keep"}
    large, small = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
    assert sizes[large] > sizes[small]
    large_first = dataclasses.replace(problem, host_capacity=sizes[small])
    large_first.__dict__["classes"] = {large: problem.classes[large], small: problem.classes[small]}  # (cached)
    assert with_sources_offloaded(large_first, whole, "forward") == tuple(_sources_moved(whole, problem.classes[small]))
    with pytest.raises(ValueError, match="'lowest peak' or 'forward'"):
        with_sources_offloaded(problem, whole, "backward")


def test_the_second_start_moves_only_classes_saved_whole_in_forward_order():
    """``order="forward"``: a class with a member nothing re-runs from stays as it is; the others
    are offloaded first to last while the host budget lasts."""
    from memopt.planner.greedy import with_sources_offloaded, whole_blocks_plan
    from memopt.planner.problem import offloaded_bytes

    problem = _chunked_lora_problem()
    whole = whole_blocks_plan(problem)
    saved = [g for g in problem.classes.values() if g[0].extra and any(whole[c.index].action == "keep" for c in g)]
    wholly = [g for g in saved if all(whole[c.index].action == "keep" for c in g)]
    assert wholly and len(wholly) < len(saved)
    forward = with_sources_offloaded(problem, whole, "forward")
    moved = [c.index for c in problem.candidates if forward[c.index] != whole[c.index]]
    assert moved == sorted(c.index for g in wholly for c in g)
    room = sum(c.nbytes for c in wholly[0])
    tight = with_sources_offloaded(dataclasses.replace(problem, host_capacity=room), whole, "forward")
    assert offloaded_bytes(problem, tight) == room
    assert [c.index for c in problem.candidates if tight[c.index] != whole[c.index]] == [c.index for c in wholly[0]]


def test_a_recompute_source_no_recomputation_reads_is_not_saved(llama3):
    """A source saved (kept or offloaded) with no dependent recomputed costs bytes and copies for
    nothing, and the lowering (torch's partitioner saves what the backward reads) would not save
    it: the solver's indifferent choice is put back to drop, and a used one stays."""
    from memopt.planner.greedy import whole_blocks_plan
    from memopt.planner.problem import without_idle_sources

    problem = llama3
    whole = whole_blocks_plan(problem)
    assert without_idle_sources(problem, whole) == whole  # every source it saves is read
    # One class of sources whose dependents are all kept instead: idle, dropped; nothing else moves.
    source = next(c for c in problem.candidates if c.extra and whole[c.index].action == "keep")
    members = problem.classes[source.klass]
    choices = list(whole)
    for c in members:
        for t in problem.dependents[c.index]:
            choices[t] = Choice("keep")
        choices[c.index] = Choice("offload", c.first_backward)
    pruned = without_idle_sources(problem, choices)
    assert all(pruned[c.index] == Choice("drop") for c in members)
    assert all(pruned[c.index] == choices[c.index] for c in problem.candidates if not c.extra)
    # Nothing recomputed: no source is read, whatever the solver said of it.
    kept = [Choice("keep") for c in problem.candidates]
    assert without_idle_sources(problem, kept) == keep_all(problem)


def test_a_source_whose_class_is_read_but_it_is_not_is_not_saved():
    """The last block's output shares a class with the other blocks' outputs, which their next
    block is re-made from; the solver decides the class (keep), but nothing recomputes from the
    last one: the plan's final word (``each=True``) drops it alone, as the lowering does."""
    from memopt.planner.greedy import whole_blocks_plan
    from memopt.planner.problem import without_idle_sources

    model = tiny_llama(num_hidden_layers=3).to(torch.bfloat16)  # full training: the residual stream is a source
    batch = lm_batch(model, batch=4, seq=64)
    del batch["attention_mask"]
    problem = build_problem(trace_joint(model, batch, device="cuda", granularity=512), RTX)
    whole = whole_blocks_plan(problem)
    idle = next(c for c in problem.candidates if c.extra and whole[c.index].action == "drop" and
                any(whole[m.index].action == "keep" for m in problem.classes[c.klass]))
    choices = list(whole)
    choices[idle.index] = Choice("keep")  # as the solver decides it: one action per class
    assert not any(choices[t].action == "recompute" for t in problem.dependents[idle.index])
    assert without_idle_sources(problem, choices) == tuple(choices)
    alone = without_idle_sources(problem, choices, each=True)
    assert alone == tuple(whole)


def test_the_outputs_of_one_op_are_decided_together_and_their_recomputation_is_counted_once(llama3):
    """Attention makes its output and its log-sum-exp in one op: one class, and recomputing both
    costs the op's time once (the lowered step re-runs it once)."""
    problem = llama3
    twins = [c for c in problem.candidates if c.made_with is not None]
    assert {"attention" in c.target for c in twins} == {True, False}  # and dropout's mask beside its output
    assert all("attention" in c.target or "dropout" in c.target for c in twins)
    for c in twins:
        first = problem.candidates[c.made_with]
        assert (first.define, first.klass, first.closure) == (c.define, c.klass, c.closure)
        assert c.recompute_us == 0 < first.recompute_us and first.made_with is None
    choices = list(keep_all(problem))
    c = next(c for c in twins if "attention" in c.target)
    for t in problem.classes[c.klass]:
        choices[t.index] = Choice("recompute", t.first_backward)
    result = evaluate(problem, choices)
    assert result.valid
    assert result.recompute_us == sum(problem.candidates[t.made_with].recompute_us
                                      for t in problem.classes[c.klass] if t.made_with is not None)


def test_an_offloaded_tensor_a_recomputation_reads_may_be_fetched_before_its_first_backward_use(llama3):
    """Attention's output offloaded, and the block's residual re-made from it before attention's
    backward reads it: the copy is fetched for that earlier point (on device from there), so the
    plan need not keep the residual too. A fetch for the first backward use alone leaves the
    recomputation without its input."""
    problem = llama3
    early = [c for c in problem.candidates if len(c.offload_points) > 1]
    assert early and all(not c.extra and c.offload_points == c.points for c in early)
    readers = {d for c in problem.candidates for d in c.deps}
    assert all(c.offload_points == (c.first_backward,) for c in problem.candidates
               if c.index not in readers or c.extra)
    for c in problem.candidates:
        assert len(c.fetch_starts) == len(c.offload_points) and list(c.fetch_starts) == sorted(c.fetch_starts)
        assert all(s <= m for s, m in zip(c.fetch_starts, c.offload_points))
    # A dependent recomputed before its input's first backward use, the input offloaded.
    t, d = next((t, problem.candidates[d]) for t in problem.candidates if "recompute" in t.allowed
                for d in t.deps if "offload" in problem.candidates[d].allowed
                and problem.candidates[d].offload_points[0] <= t.points[0] < problem.candidates[d].first_backward)
    m = t.points[0]
    fetch = max(p for p in d.offload_points if p <= m)
    base = list(keep_all(problem))
    for member in problem.classes[t.klass]:  # the same point in every block of its class
        base[member.index] = Choice("recompute", member.points[t.points.index(m)])
    late, soon = list(base), list(base)
    for member in problem.classes[d.klass]:
        late[member.index] = Choice("offload", member.first_backward)
        soon[member.index] = Choice("offload", member.offload_points[d.offload_points.index(fetch)])
    assert not evaluate(problem, late).valid
    result = evaluate(problem, soon)
    assert result.valid, result.problems
    # Off device from its copy out until the fetch for the earlier point, exactly.
    kept = evaluate(problem, base).memory
    expected = [0] * problem.num_points
    for member in problem.classes[d.klass]:
        start = member.fetch_starts[member.offload_points.index(soon[member.index].point)]
        for p in range(max(member.last_forward, member.ready) + 1, start):
            expected[p] -= member.nbytes
    assert [a - b for a, b in zip(result.memory, kept)] == expected and min(expected) < 0


def test_updates_inside_backward_add_their_transient_only_where_a_gradient_is_made():
    """Updated inside backward, a parameter's update runs right after its gradient is made: one
    update's transient at those points and nowhere else (at every backward point the smallest plan
    of a 4-layer LoRA Llama was over-predicted by the transient, 8,192 bytes)."""
    from memopt.planner.problem import _base, _updates

    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model)
    get_pass("lora").apply(model, build_model_graph(model, (), batch), LoraConfig(rank=4), RewriteLog(model))
    trace = trace_joint(model, batch, device="cuda", granularity=512)
    assert trace.optimizer_step_bytes > 0
    base = _base(trace, trace.uses(), in_backward=True)
    added = {p: u - b for p, (u, b) in enumerate(zip(_updates(trace, base, True), base)) if u != b}
    made = {s.producer for s in trace.storages if s.kind == "gradient"}
    assert len(made) == sum(p.requires_grad for p in model.parameters()) and set(added) == made
    assert set(added.values()) == {trace.optimizer_step_bytes}
    assert _updates(trace, base, False) == base
