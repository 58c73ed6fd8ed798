"""HF ``Trainer`` whose checkpoints of a memopt model hold only what was trained.

``transformers.Trainer`` saves any model that is not a ``PreTrainedModel`` / ``PeftModel`` as its
whole ``state_dict`` — every frozen weight in every checkpoint (and tied weights refuse to be
written to safetensors). This subclass saves an ``OptimizedModel`` with its own
``save_pretrained`` (the trained tensors, the method, the plan: ``memopt.checkpoint``) and resumes
from such a checkpoint by loading them back (optimizer, scheduler and RNG states resume as
Trainer's own). Any other model is Trainer's business, unchanged.

    from memopt.integrations.hf import Trainer
    Trainer(model=optimized, args=args, train_dataset=data).train(resume_from_checkpoint=True)
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

from memopt.checkpoint import CONFIG_FILE, load_trained, read_checkpoint
from memopt.runtime.optimized import OptimizedModel

__all__ = ["Trainer"]

TRAINING_ARGS_NAME = "training_args.bin"


class Trainer(transformers.Trainer):
    """``transformers.Trainer``; an ``OptimizedModel``'s checkpoints hold only its trained tensors.
    For a plan that updates inside backward, Trainer's global-norm clipping (``max_grad_norm``) would
    find no gradient left and clip nothing: it must be 0, and clipping is per parameter
    (``model.make_optimizer(max_grad_norm=...)``); more than one accumulation step is refused unless
    the planned optimizer accumulates inside backward (GaLore's ``accumulate=True``)."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        plan = getattr(self.model, "plan", None) if isinstance(self.model, OptimizedModel) else None
        if plan is not None and plan.update_in_backward:
            if self.args.max_grad_norm:
                raise ValueError(f"this model's plan updates each parameter inside backward, so Trainer's "
                                 f"max_grad_norm={self.args.max_grad_norm} would clip nothing (no gradient is "
                                 "left after backward): set max_grad_norm=0 and clip per parameter with "
                                 "model.make_optimizer(max_grad_norm=...)")
            if self.args.gradient_accumulation_steps > 1 and not plan.optimizer_options.get("accumulate"):
                raise ValueError("this model's plan updates each parameter inside backward: one backward per "
                                 "optimizer step, so gradient_accumulation_steps must be 1 (raise the batch; plan "
                                 "with optimizer='galore-adamw' or 'galore-adamw8bit' and optimizer_options="
                                 "{'accumulate': True}; or plan with memopt.PlannerConfig("
                                 "allow_update_in_backward=False) and more memory)")
        return super().train(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not isinstance(self.model, OptimizedModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        self.model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.model if model is None else model
        if isinstance(target, OptimizedModel) and os.path.isfile(os.path.join(resume_from_checkpoint, CONFIG_FILE)):
            load_trained(target.model, read_checkpoint(resume_from_checkpoint))
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if isinstance(self.model, OptimizedModel) and best and os.path.isfile(os.path.join(best, CONFIG_FILE)):
            load_trained(self.model.model, read_checkpoint(best))
            return None
        return super()._load_best_model()
