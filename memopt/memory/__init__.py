"""Exact live-bytes measurement (``MemoryTracker``) and fake-device simulation (``simulate_step``)."""

from memopt.memory.inputs import normalize_inputs
from memopt.memory.report import Category, MemoryBreakdown, MemoryReport
from memopt.memory.simulate import ADAMW, OptimizerFactory, simulate_step, torch_optimizer
from memopt.memory.tracker import MemoryTracker

__all__ = [
    "Category",
    "MemoryBreakdown",
    "MemoryReport",
    "MemoryTracker",
    "ADAMW",
    "OptimizerFactory",
    "normalize_inputs",
    "simulate_step",
    "torch_optimizer",
]
