"""memopt: train and fine-tune PyTorch models inside a device-memory budget.

    model = memopt.optimize(model, budget_gb=24, example_inputs=batch, method="lora")
    print(model.plan.summary())
"""

from memopt._version import package_version
from memopt.api import from_pretrained, optimize
from memopt.config import (
    DEVICE_PRESETS,
    DeviceSpec,
    FullConfig,
    LisaConfig,
    LoraConfig,
    OptimizeConfig,
    OwloreConfig,
    PacaConfig,
    QuantizeConfig,
    RandLoraConfig,
    RsoConfig,
    S2ftConfig,
)
from memopt.errors import InfeasibleBudgetError, MemoptError, PlanMismatchError, UnsupportedModelError
from memopt.optim import OptimizerConfig
from memopt.plan import Action, Plan, PlanFileError, load_plan
from memopt.planner.solve import PlannerConfig
from memopt.runtime.optimized import OptimizedModel

__all__ = [
    "optimize",
    "from_pretrained",
    "OptimizeConfig",
    "LoraConfig",
    "PacaConfig",
    "RandLoraConfig",
    "RsoConfig",
    "LisaConfig",
    "OwloreConfig",
    "S2ftConfig",
    "FullConfig",
    "OptimizerConfig",
    "QuantizeConfig",
    "DeviceSpec",
    "DEVICE_PRESETS",
    "Plan",
    "PlannerConfig",
    "load_plan",
    "Action",
    "PlanFileError",
    "OptimizedModel",
    "MemoptError",
    "InfeasibleBudgetError",
    "PlanMismatchError",
    "UnsupportedModelError",
]

__version__ = package_version()
