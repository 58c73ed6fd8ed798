"""The activation planner: keep / recompute / offload every saved activation inside a byte budget.

    problem = build_problem(trace_joint(model, inputs, ...), device)   # problem.py, costmodel.py
    plan = plan_activations(problem, usable_bytes)                     # solve.py -> cpsat.py, greedy.py

``plan.py`` is the versioned, JSON-serialisable Plan; ``report.py`` its summary and diffs;
``reference.py`` the exhaustive and MILP solvers that check CP-SAT's optimality in tests.
"""
