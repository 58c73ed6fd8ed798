"""CP-SAT finds the exact optimum of the planning model: checked against exhaustive search and an
independent MILP (SCIP), both phases, with and without offload, with shared identical blocks."""

from __future__ import annotations

import dataclasses

import pytest

from memopt.planner.costmodel import DEVICE_PRESETS
from memopt.planner.cpsat import SolverOptions, choose_quantum, solve_min_peak, solve_min_time, time_limit_for
from memopt.planner.greedy import greedy_plan
from memopt.planner.problem import build_problem, evaluate, keep_all
from memopt.planner.reference import exhaustive, milp
from tests.planner._synthetic import chain_trace

EXACT = SolverOptions(quantum=1)  # bytes unquantised, so the model is exactly `evaluate`
RTX = DEVICE_PRESETS["rtx4090"]
SLOW_LINK = dataclasses.replace(RTX, name="slow-link", host_bandwidth=2 * 10**9)  # copies cost time


def _between(problem, low: int, share: int = 4) -> int:
    """A capacity a share of the way from ``low`` up to the keep-all peak."""
    keep = evaluate(problem, keep_all(problem)).peak_bytes
    return low + (keep - low) // share


@pytest.mark.parametrize("seed", [9, 12, 13, 14])
@pytest.mark.parametrize("device", [RTX, SLOW_LINK], ids=["rtx4090", "slow-link"])
def test_both_phases_equal_exhaustive_search(seed, device):
    problem = build_problem(chain_trace(7, seed), device)
    best_peak, _ = exhaustive(problem, None)
    phase1 = solve_min_peak(problem, EXACT)
    assert phase1.status == "OPTIMAL" and phase1.objective == best_peak
    capacity = _between(problem, best_peak, share=5)
    best_time, _ = exhaustive(problem, capacity)
    phase2 = solve_min_time(problem, capacity, EXACT)
    assert phase2.status == "OPTIMAL" and phase2.objective == best_time
    result = evaluate(problem, phase2.choices)
    assert result.valid and result.peak_bytes <= capacity and result.overhead_us == best_time


def test_without_a_time_limit_each_phase_gets_one_by_the_problems_size():
    """``time_limit_s=None``: 0.1 s per saved tensor, from 10 s (a tiny model) to 60 s (an 8B model
    at long context has 647); a tiny problem is still solved to optimality with it."""
    problem = build_problem(chain_trace(7, 9), RTX)
    assert len(problem.candidates) == 5 and time_limit_for(problem) == 10.0
    assert time_limit_for(dataclasses.replace(problem, candidates=problem.candidates * 70)) == 35.0  # 350
    assert time_limit_for(dataclasses.replace(problem, candidates=problem.candidates * 200)) == 60.0  # 1,000
    auto = SolverOptions(time_limit_s=None, workers=1)
    best_peak, _ = exhaustive(problem, None)
    assert solve_min_peak(problem, auto).objective == best_peak
    with pytest.raises(ValueError, match="or None: by the problem's size"):
        SolverOptions(time_limit_s=0)


def test_identical_blocks_share_one_decision_and_match_exhaustive_search():
    problem = build_problem(chain_trace(3, 5, blocks=3), SLOW_LINK)
    assert problem.num_classes < len(problem.candidates)
    best_peak, _ = exhaustive(problem, None)
    assert solve_min_peak(problem, EXACT).objective == best_peak
    capacity = _between(problem, best_peak, share=3)
    phase2 = solve_min_time(problem, capacity, EXACT)
    assert phase2.objective == exhaustive(problem, capacity)[0]
    for group in problem.classes.values():
        assert len({phase2.choices[c.index].action for c in group}) == 1


@pytest.mark.parametrize("n,seed,blocks,offload", [(40, 1, 0, True), (40, 2, 0, False), (12, 3, 4, True), (60, 4, 0, True)])
def test_both_phases_equal_an_independent_milp_on_larger_graphs(n, seed, blocks, offload):
    problem = build_problem(chain_trace(n, seed, blocks=blocks), SLOW_LINK, allow_offload=offload)
    assert 20 <= len(problem.candidates) <= 60
    phase1 = solve_min_peak(problem, EXACT)
    assert phase1.objective == milp(problem, None)
    capacity = _between(problem, phase1.objective)
    phase2 = solve_min_time(problem, capacity, EXACT)
    assert phase2.status == "OPTIMAL" and phase2.objective == milp(problem, capacity) > 0


def test_quantised_plans_fit_in_exact_bytes():
    problem = build_problem(chain_trace(60, 4), SLOW_LINK)
    default = choose_quantum(problem)
    assert default & (default - 1) == 0 and default > 1  # a power of two, so ~2^20 quanta span the peak
    quantum = 4096  # coarser than the default: every term rounds up by up to 4 KiB
    phase1 = solve_min_peak(problem, SolverOptions(quantum=quantum))
    capacity = _between(problem, phase1.objective)
    phase2 = solve_min_time(problem, capacity, SolverOptions(quantum=quantum))
    result = evaluate(problem, phase2.choices)
    assert result.valid and result.peak_bytes <= capacity
    assert result.overhead_us >= solve_min_time(problem, capacity, EXACT).objective  # rounding only costs


def test_the_greedy_warm_start_is_valid_and_fits_when_it_says_so():
    problem = build_problem(chain_trace(40, 1), SLOW_LINK)
    least = greedy_plan(problem, 0)
    assert evaluate(problem, least).valid
    capacity = _between(problem, evaluate(problem, least).peak_bytes)
    plan = greedy_plan(problem, capacity)
    result = evaluate(problem, plan)
    assert result.valid and result.peak_bytes <= capacity


def test_a_traced_tiny_llama_plan_equals_the_milp_optimum():
    from memopt.config import LoraConfig
    from memopt.ir.joint import trace_joint
    from memopt.ir.structure import build_model_graph
    from memopt.passes import RewriteLog, get_pass
    from tests.models import lm_batch, tiny_llama

    model = tiny_llama()
    batch = lm_batch(model)
    get_pass("lora").apply(model, build_model_graph(model, (), batch), LoraConfig(rank=4), RewriteLog(model))
    problem = build_problem(trace_joint(model, batch, device="cpu"), DEVICE_PRESETS["cpu"])  # recompute only
    assert len(problem.candidates) <= 60 and any(c.extra for c in problem.candidates)
    least = solve_min_peak(problem, EXACT).objective
    assert least == milp(problem, None)
    capacity = _between(problem, least, 3)
    phase2 = solve_min_time(problem, capacity, EXACT)
    assert phase2.status == "OPTIMAL" and phase2.objective == milp(problem, capacity) > 0


def test_runs_of_identical_blocks_are_decided_on_their_own_and_no_plan_is_slower():
    """Nine layers: blocks 1-8 are identical and share their decisions in two runs of four. Where
    recomputing a tensor in every block costs more than the budget needs, the plan recomputes it in
    one run only: faster than the best plan deciding all eight blocks alike (``merged``), which
    the minimum-peak phase solves and hints with."""
    from memopt.config import LoraConfig
    from memopt.ir.joint import trace_joint
    from memopt.ir.structure import build_model_graph
    from memopt.passes import RewriteLog, get_pass
    from memopt.planner.problem import merged
    from tests.models import lm_batch, tiny_llama

    model = tiny_llama(num_hidden_layers=9)
    batch = lm_batch(model)
    del batch["attention_mask"]
    get_pass("lora").apply(model, build_model_graph(model, (), batch), LoraConfig(rank=4), RewriteLog(model))
    problem = build_problem(trace_joint(model, batch, device="cuda", granularity=512), RTX, allow_offload=False)
    shared = {blocks for blocks in problem.class_blocks.values() if len(blocks) > 1}
    assert shared == {(1, 2, 3, 4), (5, 6, 7, 8)}
    one = merged(problem)
    assert {blocks for blocks in one.class_blocks.values() if len(blocks) > 1} == {(1, 2, 3, 4, 5, 6, 7, 8)}
    positions = sum(len(blocks) > 1 for blocks in problem.class_blocks.values()) // 2
    assert one.num_classes == problem.num_classes - positions  # one class less per position
    options = SolverOptions(workers=1, time_limit_s=2)
    low = solve_min_peak(one, options).objective
    capacity = _between(problem, low, share=3)
    alike = solve_min_time(one, capacity, options)
    runs = solve_min_time(problem, capacity, options, hint=alike.choices)
    assert alike.status == runs.status == "OPTIMAL"
    assert runs.objective < alike.objective
    assert evaluate(problem, alike.choices).valid  # an assignment of the merged problem is one of this one
    actions: dict[int, set[str]] = {}
    for c, choice in zip(problem.candidates, runs.choices):
        actions.setdefault(problem.run_of[c.klass], set()).add(choice.action)
    assert any(len(a) > 1 for a in actions.values())  # some tensor saved in one run, recomputed in the other


def test_the_models_device_bytes_are_exact_and_grow_with_the_events_not_points_times_terms():
    """With a quantum of one byte, the model's peak of any assignment is ``evaluate``'s peak to the
    byte (segments are kept as changes from the one before, summed back here), and what the model
    holds is at most one term per event, not one per live term at every point."""
    from memopt.planner.cpsat import _Model
    from memopt.planner.greedy import whole_blocks_plan, with_sources_offloaded

    problem = build_problem(chain_trace(60, 4), SLOW_LINK)
    model = _Model(problem, 1)
    events = model._events()[1]
    segments = model.segments()
    assert sum(len(s.change) for s in segments) <= sum(len(e) for e in events.values())
    assert max(s.size for s in segments) > 1 and len(segments) > 1
    keep = evaluate(problem, keep_all(problem)).peak_bytes
    plans = {keep_all(problem), whole_blocks_plan(problem), with_sources_offloaded(problem, whole_blocks_plan(problem)),
             *(greedy_plan(problem, keep * share // 8) for share in range(8))}  # valid plans of every kind
    for choices in plans:
        result = evaluate(problem, choices)
        assert result.valid and model.peak_in_quanta(choices) == result.peak_bytes
    assert len({c.action for plan in plans for c in plan}) == 3 and len(plans) >= 5  # keep, recompute, offload


@pytest.mark.parametrize("chain_from", [0, 10**6], ids=["chains", "sums"])
def test_on_the_device_by_a_point_is_the_same_as_a_chain_of_running_sums(monkeypatch, chain_from):
    """A recomputed tensor's input must be on the device by its point: written as one sum over the
    input's points, or (many points) a chain of running sums, two terms per dependency. Both give
    the independent MILP's optimum in both phases."""
    from memopt.planner import cpsat

    monkeypatch.setattr(cpsat, "_CHAIN_FROM", chain_from)
    problem = build_problem(chain_trace(24, 3, blocks=2), SLOW_LINK, allow_offload=True)
    assert max(len(c.points) + len(c.offload_points) for c in problem.candidates) > 4
    phase1 = solve_min_peak(problem, EXACT)
    assert phase1.objective == milp(problem, None)
    capacity = _between(problem, phase1.objective)
    assert solve_min_time(problem, capacity, EXACT).objective == milp(problem, capacity)
    model = cpsat._Model(problem, 1)
    chained = any(isinstance(v, cpsat.cp_model.IntVar) for _, chain in model._chains.values() for v in chain[1:])
    assert chained == (chain_from == 0)


def test_the_quantum_rounds_the_widest_segment_up_by_at_most_a_thousandth_of_the_capacity():
    """At long context thousands of terms are alive at once: a quantum from the keep-everything peak
    alone (2**20 of them) made the model's peak of a 70B plan 10 GiB higher than its bytes. Chosen
    for the widest segment and the capacity, the model's peak of any plan is within 1/1024 of the
    capacity of its exact bytes, and never below them."""
    from memopt.planner.cpsat import _Model

    problem = build_problem(chain_trace(60, 4), SLOW_LINK)
    low = solve_min_peak(problem, EXACT).objective
    capacity = _between(problem, low, share=8)
    coarsest = choose_quantum(problem)
    model = _Model(problem, None, scale=capacity)
    widest = max(s.size for s in model.segments())
    assert model.quantum & (model.quantum - 1) == 0 and model.quantum <= coarsest
    assert (widest + 1) * model.quantum <= capacity // 1024
    assert _Model(problem, None, scale=capacity // 64).quantum < coarsest  # a smaller capacity: finer
    plans = [greedy_plan(problem, low + (capacity - low) * k // 4) for k in range(5)]
    for choices in plans:
        exact = evaluate(problem, choices).peak_bytes
        assert exact <= model.peak_in_quanta(choices) * model.quantum <= exact + capacity // 1024
    result = solve_min_time(problem, capacity, SolverOptions(workers=1))
    assert result.quantum == model.quantum and evaluate(problem, result.choices).peak_bytes <= capacity


@pytest.mark.parametrize("host", [None, 10**6], ids=["no-host-limit", "tight-host"])
def test_each_phases_warm_start_is_a_complete_assignment_the_model_accepts(monkeypatch, host):
    """Every variable is hinted and the hint is feasible (CP-SAT takes it as its first solution
    before any search: on Llama-3.3-70B at 18,432 tokens a hint missing only the peak left the
    minimum-peak phase with no plan after 60 s). With a tight host budget the residual stream's
    checkpoints are offloaded per decision class, not member by member (a class half offloaded is
    no assignment of the model)."""
    from ortools.sat.python import cp_model

    from memopt.planner import cpsat

    models = []
    run = cpsat._Model.run
    monkeypatch.setattr(cpsat._Model, "run", lambda self, *a, **k: models.append(self) or run(self, *a, **k))
    problem = build_problem(chain_trace(60, 1, blocks=3), SLOW_LINK, allow_offload=True, host_capacity=host)
    options = SolverOptions(time_limit_s=0.05, workers=1)
    phase1 = solve_min_peak(problem, options)
    capacity = _between(problem, phase1.objective)
    phase2 = solve_min_time(problem, capacity, options, hint=phase1.choices)
    assert phase1.status != cpsat.WARM_START and phase2.status != cpsat.WARM_START
    for model in models:
        proto = model.cp.Proto()
        assert len(set(proto.solution_hint.vars)) == len(proto.variables)
        solver = cp_model.CpSolver()
        solver.parameters.fix_variables_to_their_hinted_value = True
        solver.parameters.num_workers = 1
        assert solver.Solve(model.cp) in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    tiny = SolverOptions(time_limit_s=1e-9, workers=1)  # CP-SAT finds nothing: the warm start is returned
    fallback = solve_min_peak(problem, tiny)
    assert fallback.status == cpsat.WARM_START and evaluate(problem, fallback.choices).valid
    assert phase1.objective <= fallback.objective


def test_relaxing_the_minimum_peak_plan_keeps_what_a_larger_budget_has_room_for():
    """The minimum-time phase's warm start from the minimum-peak plan: classes moved back towards
    keeping while the plan fits. Valid, within the capacity, no slower than the minimum-peak plan
    (faster where the capacity leaves room) and no faster than the optimum."""
    from memopt.planner.greedy import relaxed

    faster = 0
    for seed, host in ((1, None), (2, None), (3, 10**6), (4, 3 * 10**6)):
        problem = build_problem(chain_trace(40, seed, blocks=2), SLOW_LINK, allow_offload=True, host_capacity=host)
        phase1 = solve_min_peak(problem, EXACT)
        start = evaluate(problem, phase1.choices)
        for share in (2, 4, 8):
            capacity = _between(problem, phase1.objective, share=share)
            result = evaluate(problem, relaxed(problem, phase1.choices, capacity))
            assert result.valid and result.peak_bytes <= capacity and result.overhead_us <= start.overhead_us
            if share == 4:  # (one capacity per problem against the independent optimum: it is slow)
                assert milp(problem, capacity) <= result.overhead_us
            faster += result.overhead_us < start.overhead_us
    assert faster >= 6


def test_a_move_to_recompute_brings_its_inputs_forward_and_stays_valid():
    """Recomputing a tensor earlier than one of its inputs is fetched or recomputed moves that
    input's fetch or recomputation forward, in turn (on Llama-3.1-8B at 524,288 tokens keys and
    values could not be recomputed without it, their LoRA inputs being fetched after them, so
    attention's output was offloaded in 9 layers, not 25: +19.7 % where +6.5 % fits); a class whose
    members read one another across blocks has each by its reader's point. Every such move of
    every class from a minimum-peak plan is a valid assignment, and many needed an input moved."""
    from memopt.planner.greedy import _moved

    repeatable = dataclasses.replace(EXACT, workers=1)
    moves = readied = 0
    shapes = [(40, seed, blocks) for seed in range(1, 5) for blocks in (1, 2)]
    shapes += [(5, seed, 3) for seed in range(55, 65)]  # (seed 59: a member reads the one before it)
    for n, seed, blocks in shapes:
        problem = build_problem(chain_trace(n, seed, blocks=blocks), SLOW_LINK, allow_offload=True)
        start = solve_min_peak(problem, repeatable).choices
        for klass, group in problem.classes.items():
            trial = _moved(problem, problem.classes, start, group, "recompute")
            if trial is None:
                continue
            moves += 1
            assert evaluate(problem, trial).valid, (n, seed, blocks, klass)
            readied += any(problem.candidates[i].klass != klass and new != old
                           for i, (new, old) in enumerate(zip(trial, start)))
    assert moves >= 200 and readied >= 50
