"""The Plan: memopt's decisions for one training step as data — its schema (``schema``), its text
report (``report``) and its picture (``draw``). Imported by the planner that makes plans and by the
runtime that carries them out; it imports neither."""

from memopt.plan.schema import (
    PLAN_FORMAT_VERSION,
    RUNTIME_ACTIONS,
    Action,
    MemoryTimeline,
    Plan,
    PlanFileError,
    SolverReport,
    StaticMemory,
    StepPlan,
    TensorDecision,
    check_writable,
    load_plan,
)

__all__ = ["PLAN_FORMAT_VERSION", "RUNTIME_ACTIONS", "Action", "MemoryTimeline", "Plan", "PlanFileError",
           "SolverReport", "StaticMemory", "StepPlan", "TensorDecision", "check_writable", "load_plan"]
