"""The module `memopt.optimize` returns: the rewritten model with its Plan attached.

``OptimizedModel`` is an ``nn.Module`` whose ``forward`` has the wrapped model's signature (HF
Trainer reads it to pick dataset columns) and returns the wrapped model's outputs unchanged.
Attributes it does not have are looked up on the wrapped model (``config``, ``generate``, ...).

A training step (autograd recording) is the plan's:

* its inputs are checked against the planned ones (same tensor names, dtypes and number of
  dimensions, else ``ValueError`` naming the input);
* inputs larger than planned re-plan for the larger shapes (``larger_inputs="replan"``, the
  default: logged with the time it took) or raise ``PlanMismatchError`` (``"error"``); smaller
  ones run with the same decisions;
* a step in another train/eval mode or autocast state than planned re-plans for it, and so do a
  padded batch after one without padding and the reverse (an HF ``attention_mask`` of all ones
  traces no mask tensor: ``memopt.memory.hf_masks``), and one whose traced program no longer
  holds the plan's tensors (an adapter disabled, dropout switched on): a stale plan never runs.
  Plans made so are kept per state (``max_plans``), so switching back costs nothing; so is the
  plan ``optimize`` made (or ``use_plan`` installed), for the first step in its state, even when the
  loop's first steps are in another state;
* when the plan recomputes or offloads anything (or ``compile=True``) the step runs lowered
  (``runtime``, a ``memopt.runtime.step.PlannedStep``: eager or compiled); otherwise the wrapped
  model runs as it is, which is then exactly the plan. Either way it gets ``use_cache=False``
  unless the caller sets it (``memopt.memory.inputs.training_kwargs``), as the plan was made.

Without grad the wrapped model runs unchanged. ``torch.compile(optimized)`` compiles around the
lowered step, which runs as memopt lowered it (a graph break; ``compile=True`` is how to compile it).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from memopt.errors import InfeasibleBudgetError, MemoptError, PlanMismatchError
from memopt.ir.joint import attention_kernels
from memopt.memory import hf_masks
from memopt.memory.autocast import planned_autocast
from memopt.memory.hf_masks import eager_masks
from memopt.memory.inputs import input_shapes, tensor_inputs, training_kwargs
from memopt.passes import cut_ce, layerwise, rso, seq_chunk
from memopt.passes.int8train import is_handle
from memopt.plan import RUNTIME_ACTIONS, Action, Plan
from memopt.plan.report import applied_lines, format_bytes
from memopt.runtime import in_backward
from memopt.runtime.fingerprint import structural_fingerprint
from memopt.runtime.guards import step_state
from memopt.runtime.step import describe_shapes

__all__ = ["Applied", "OptimizedModel", "LARGER_INPUTS", "wrap"]

log = logging.getLogger("memopt")

LARGER_INPUTS = ("replan", "error")
_MAX_PLANS = 4  # plans kept per model, one per step state (train/eval, autocast, adapter flags, ...)

Replan = Callable[..., Plan]  # (plan, args, kwargs, why, widen=True): a new plan

@dataclass(frozen=True)
class Applied:
    """What an ``OptimizedModel`` carries out of its plan: the runtime's own report, not part of the
    Plan (which is the same whether ``memopt plan`` predicted it or ``memopt.optimize`` returned it).

    ``actions``: the kinds of decisions this model carries out; ``lowering``: ``"eager"`` (the lowered
    step, op by op), ``"compiled"`` (through Inductor) or ``"none"`` (the model runs as it is:
    autograd keeps and drops, nothing else); ``update_in_backward``: parameters updated inside backward."""

    actions: tuple[str, ...]
    lowering: str
    update_in_backward: bool

    def covers(self, plan: Plan) -> bool:
        """Does this model carry out every decision of ``plan``?"""
        return all(t.action in self.actions for t in plan.tensors)


# Measured (benchmarks/bench_runtime.py, CPU): the eager lowering lands at or under the plan; Inductor's
# compiled graphs carry out the same decisions but rose 28 MiB above a plan that recomputes much.
class OptimizedModel(nn.Module):
    """A model rewritten by memopt. ``.model`` is the rewritten module, ``.plan`` what was done."""

    def __init__(self, model: nn.Module, plan: Plan, merge_fn: Callable[[nn.Module], nn.Module],
                 original_requires_grad: dict[int, bool], runtime: Any = None, config: Any = None) -> None:
        super().__init__()
        self.model = model
        self._config = config  # (OptimizeConfig, the QuantizeConfig applied or None): what save_pretrained writes
        self._plan = plan
        self.runtime = runtime
        self._merge_fn = merge_fn
        self._original_requires_grad = original_requires_grad
        self._merged = False
        self._signature = inspect.signature(model.forward)
        self._compile = False
        self._larger_inputs = "replan"
        self._replan: Replan | None = None
        self._plans: OrderedDict[Hashable, tuple[Plan, Any]] = OrderedDict()
        self._unkeyed: tuple[Plan, Any] | None = None  # the plan use_plan installed, until a step uses it
        self._planned_inputs: tuple[str, ...] = tuple(plan.input_shapes)  # that plan's inputs, by name
        self._said: set[str] = set()
        self.replans: list[str] = []  # why each re-plan happened, oldest first
        self._update_owner = in_backward.new_owner()  # names this model's updates inside backward

    @property
    def plan(self) -> Plan:
        """The plan the model carries out (the latest step's; a re-plan replaces it)."""
        return self._plan

    @property
    def applied(self) -> Applied:
        """What this model carries out of ``plan`` (the lowering, the kinds of decisions)."""
        lowered = self.runtime is not None
        actions = RUNTIME_ACTIONS if lowered else (Action.KEEP.value, Action.DROP.value)
        if lowered and not _offloads_here(self.model):
            actions = tuple(a for a in actions if a != Action.OFFLOAD.value)
        return Applied(actions=actions, lowering=("compiled" if self._compile else "eager") if lowered else "none",
                       update_in_backward=self._plan.update_in_backward)

    def summary(self) -> str:
        """The plan's summary (``plan.summary()``) and what this model carries out of it."""
        return "\n".join([self._plan.summary(), "",
                          *applied_lines(self._plan, self.applied.actions, runs_on=_device_of(self.model).type)])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._merged:
            raise MemoptError("this OptimizedModel was merged; use the plain model merge() returned")
        if not torch.is_grad_enabled():
            return self.model(*args, **kwargs)
        with attention_kernels():  # the kernels the plan priced, also where no runtime lowers the step
            return self._training_step(args, training_kwargs(self._signature, kwargs))

    @torch.compiler.disable
    def _training_step(self, args: tuple, kwargs: dict) -> Any:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError:
            return self.model(*args, **kwargs)  # the model's own call says what is wrong
        self._check_inputs(bound)
        device = _device_of(self.model)
        # Plans are kept per step state and per pattern of size-1 dimensions: a trace specializes
        # a size of 1 (batch 1 is another program), so such a batch gets a plan of its own.
        # A padded batch and one without padding (an attention_mask of all ones: no mask tensor) are
        # two states of the step, each with its own plan.
        unpadded = hf_masks.unpadded(self.model, args, kwargs)
        key = (step_state(self.model, device.type, self._plan.traced_trainable or ()), _unit_dims(bound), unpadded)
        known = self._plans.get(key)
        if known is None and self._unkeyed is not None and self._unkeyed[0] is not self._plan and \
                self._mismatch(self._unkeyed[0], bound, unpadded, device) is None:
            known = self._unkeyed  # the plan installed first, made for this step's state: not re-planned
        if known is not None:
            self._plan, self.runtime = known
            if key in self._plans:
                self._plans.move_to_end(key)
            cut_ce.use_pieces(self.model, self._plan.cut_cross_entropy)
        mismatch = self._mismatch(self._plan, bound, unpadded, device)
        if mismatch is not None:
            self._replan_for(args, kwargs, *mismatch)
        self._check_sampled_blocks()
        self._note_held_gradients()
        self._note_other_inputs(bound)
        if self._plan.update_in_backward and self.model.training:
            in_backward.require(self._update_owner)  # gradients held to a step after backward break the peak
        self._note_offloads_kept()
        if self.runtime is None:
            # The model as it is: HF decides its mask itself on real tensors; on fake ones (a simulated
            # step) the plan's mask state stands in for the values they do not carry.
            with eager_masks(self.model, args, kwargs, self._plan.unpadded_mask if unpadded is None else unpadded):
                output = self.model(*args, **kwargs)
        else:
            try:
                output = self.runtime(*args, **kwargs)
            except PlanMismatchError as exc:
                if self._replan is None:
                    raise
                sampler = layerwise.sampler_of(self.model)
                why = str(exc).splitlines()[0] if sampler is None else (
                    f"layerwise sampling switched to {', '.join(sampler.names[i] for i in sampler.active)}, another "
                    "program than the one planned")
                self._replan_for(args, kwargs, why)
                try:
                    output = self.model(*args, **kwargs) if self.runtime is None else self.runtime(*args, **kwargs)
                except PlanMismatchError as again:
                    # A batch smaller than the plan whose program is not the planned one at its own sizes
                    # (sizes of 0 or 1 specialize a trace: fewer tokens than sequence-chunking pieces): a
                    # plan widened to the larger shapes does not fit its program; plan at its own sizes.
                    if not _larger(self._plan.input_shapes, input_shapes(bound)):
                        raise
                    self._replan_for(args, kwargs, f"{str(again).splitlines()[0]} (planned at this batch's own "
                                     "sizes: a smaller batch traces another program)", widen=False)
                    output = self.model(*args, **kwargs) if self.runtime is None else self.runtime(*args, **kwargs)
        self._plans[key] = (self._plan, self.runtime)
        if self._unkeyed is not None and self._unkeyed[0] is self._plan:
            self._unkeyed = None
        while len(self._plans) > _MAX_PLANS:
            self._plans.popitem(last=False)
        return cut_ce.finish_output(self.model, output)

    def _mismatch(self, plan: Plan, bound: inspect.BoundArguments, unpadded: bool | None,
                  device: torch.device) -> tuple[str, bool] | None:
        """Why ``plan`` was not made for this step (and whether larger inputs are why), or None."""
        larger = _larger(input_shapes(bound), plan.input_shapes)
        if larger:
            return f"inputs larger than planned: {describe_shapes(larger)}", True
        if plan.training is not None and (plan.training, plan.autocast) != \
                (self.model.training, autocast := planned_autocast(plan.device.kind, device.type)):
            return _state_change(plan, self.model.training, autocast), False
        # (a plan made without any mask says "padded" of itself, yet it has no mask tensor either)
        maskless = "attention_mask" not in plan.input_shapes
        if unpadded is not None and (unpadded != plan.unpadded_mask or (maskless and not unpadded)):
            return ("a batch without padding (the attention_mask all ones: no mask tensor), planned with one"
                    if unpadded else "a padded batch (its attention_mask holds zeros: a mask tensor), planned without "
                    + ("an attention_mask" if maskless else "padding")), False
        return None

    def _replan_for(self, args: tuple, kwargs: dict, why: str, error_ok: bool = False, widen: bool = True) -> None:
        if self._replan is None or (error_ok and self._larger_inputs == "error"):
            raise PlanMismatchError(
                f"{why}. The plan's peak holds only for what was planned; call memopt.optimize with a batch "
                "of the new size" + (", or pass larger_inputs='replan'" if error_ok else ""))
        start = time.perf_counter()
        try:
            plan = self._replan(self._plan, args, kwargs, why) if widen else \
                self._replan(self._plan, args, kwargs, why, widen=False)
        except BaseException as exc:
            cut_ce.use_pieces(self.model, self._plan.cut_cross_entropy)  # (the re-plan re-cut them)
            if not isinstance(exc, InfeasibleBudgetError):
                raise
            raise InfeasibleBudgetError(
                f"re-planning for this call ({why}): {exc.message}. The current plan was made for inputs "
                f"{dict(self._plan.input_shapes)}: plan with memopt.optimize for the widest batch the loop makes, in "
                "the state it runs in (padding, train/eval, autocast), or with a larger budget"
                + ("" if self._plan.update_in_backward else " (a re-plan keeps the optimizer stepping after "
                   "backward; a plan that updates inside backward needs model.make_optimizer(...))"),
                predicted_bytes=exc.predicted_bytes, budget_bytes=exc.budget_bytes, breakdown=exc.breakdown,
                min_budget_bytes=exc.min_budget_bytes) from exc
        self._install(plan, self._compile)
        seconds = time.perf_counter() - start
        self.replans.append(why)
        log.warning("memopt: re-planned in %.1f s (%s): predicted peak %.3f GiB of %.3f GiB usable%s", seconds, why,
                    plan.predicted_peak_bytes / 2**30, plan.usable_bytes / 2**30,
                    ", recomputing/offloading" if plan.needs_runtime else "")

    def _note_offloads_kept(self) -> None:
        """A plan that offloads, run where host and device are one memory (a GPU plan on a CPU), keeps
        its offloaded tensors in place: the step peaks above the prediction. Say so, once."""
        if "offloads kept" in self._said or self.runtime is None or _offloads_here(self.model):
            return
        offloaded = self._plan.bytes_by_action()["offload"]
        if offloaded:
            self._said.add("offloads kept")
            log.warning("memopt: this plan offloads %s to host memory, and this model runs on %s, where host and device "
                        "are one memory: the offloaded tensors stay where they are, so this step peaks up to %s above "
                        "the predicted %s (on the plan's GPU every decision is carried out)", format_bytes(offloaded),
                        _device_of(self.model).type, format_bytes(offloaded),
                        format_bytes(self._plan.predicted_peak_bytes))

    def _note_held_gradients(self) -> None:
        """Gradients left from an earlier backward (gradient accumulation) are held through this whole
        step; the plan counts them from where the backward makes them: say so, once, with the bound."""
        if "held" in self._said or self._plan.update_in_backward or not self.model.training:
            return
        if any(p.grad is not None for p in self.model.parameters() if p.requires_grad):
            self._said.add("held")
            static = self._plan.static
            extra = 0 if static is None else static.gradients
            log.warning("memopt: this step starts with gradients from an earlier backward (gradient accumulation): the "
                        "plan counts gradients only from where the backward makes them, so a step may peak up to %s "
                        "above the predicted %s; for a bound that holds, plan with budget_gb smaller by that much (or "
                        "zero the gradients before each step)", format_bytes(extra),
                        format_bytes(self._plan.predicted_peak_bytes))

    def _check_sampled_blocks(self) -> None:
        """A plan made for every active set bounds sets of ``active_layers`` blocks: more, unfrozen
        by hand, is another step than planned (its gradients would not fit what was counted)."""
        sampler = layerwise.sampler_of(self.model)
        if not self._plan.traced_trainable or sampler is None:
            return
        active = [sampler.names[i] for i, params in enumerate(sampler.blocks) if any(p.requires_grad for p in params)]
        if len(active) > sampler.active_layers:
            raise PlanMismatchError(
                f"{len(active)} sampled blocks require grad ({', '.join(active[:4])}{', ...' if len(active) > 4 else ''})"
                f"; the plan bounds every set of active_layers={sampler.active_layers}: freeze the others (the "
                "optimizer from make_optimizer switches blocks itself), or call memopt.optimize with "
                f"active_layers={len(active)}")

    def _check_inputs(self, bound: inspect.BoundArguments) -> None:
        """The same tensor inputs as planned, each with its planned dtype and number of dimensions."""
        planned = self._plan.input_dtypes or {}
        for name, value in tensor_inputs(bound).items():
            spec = planned.get(name)
            want = self._plan.input_shapes.get(name)
            if want is not None and value.dim() != len(want):
                raise ValueError(f"input {name!r} has shape {list(value.shape)} ({value.dim()} dimensions); the plan "
                                 f"was made for {list(want)} ({len(want)} dimensions)")
            if spec is not None and str(value.dtype).replace("torch.", "") != spec:
                raise ValueError(f"input {name!r} is {str(value.dtype).replace('torch.', '')}{list(value.shape)}; "
                                 f"the plan was made for {spec}{list(want or ())}")
            if value.numel() == 0 and want is not None and 0 not in want:
                raise ValueError(f"input {name!r} is empty ({list(value.shape)}): there is nothing to train on")

    def _note_other_inputs(self, bound: inspect.BoundArguments) -> None:
        # (against the inputs use_plan's plan was made with: a re-plan for this call is made without them)
        missing = sorted(set(self._planned_inputs) - set(input_shapes(bound)))
        if missing and "missing" not in self._said:
            self._said.add("missing")
            log.warning("memopt: this training step has no %s, which the plan was made with: the plan's decisions "
                        "apply where this step makes the same tensors, and what your loop computes from the outputs "
                        "(its loss) is not in the plan; pass loss_fn= (and these inputs) to memopt.optimize to plan "
                        "it", ", ".join(missing))

    def use_plan(self, plan: Plan, *, compile: bool = False, larger_inputs: str = "replan",
                 replan: Replan | None = None) -> "OptimizedModel":
        """Carry out ``plan`` from now on (e.g. one read with ``memopt.load_plan``); returns self.

        The plan must have been made for this model as rewritten (same structural fingerprint)
        and its inputs; a mismatch raises ``PlanMismatchError`` (here, or at the first step for a
        tensor the step does not make, when there is no ``replan``). ``compile``: run the step
        through Inductor. ``larger_inputs``: ``"replan"`` (needs ``replan``; a model returned by
        ``optimize`` has one) or ``"error"``.
        """
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a memopt Plan, got {type(plan).__name__}")
        if larger_inputs not in LARGER_INPUTS:
            raise ValueError(f"larger_inputs must be one of {LARGER_INPUTS}, got {larger_inputs!r}")
        if plan.fingerprint is not None and plan.fingerprint != structural_fingerprint(self.model):
            raise PlanMismatchError(
                f"the plan was made for another model ({plan.model}, method {plan.method}): its structural "
                f"fingerprint {plan.fingerprint} differs from this model's {structural_fingerprint(self.model)} "
                "(parameter names, shapes, dtypes, trainability or module types)")
        fused, pieces = plan.cut_cross_entropy, cut_ce.pieces(self.model)
        if (fused is None) != (pieces is None):
            raise PlanMismatchError(
                f"the plan {'fuses' if fused else 'does not fuse'} the LM head and the loss (cut cross-entropy) and "
                f"this model {'does not' if fused else 'does'}: its step makes other tensors than the plan counts; "
                "memopt.from_pretrained(base, directory) rebuilds the model a saved plan was made for, or plan this "
                "model with memopt.optimize")
        self._replan = replan
        self._larger_inputs = larger_inputs
        self._plans.clear()
        cut_ce.use_pieces(self.model, fused)
        self._install(plan, compile)
        self._unkeyed = (self._plan, self.runtime)  # kept for the first step in its state, whenever that comes
        self._planned_inputs = tuple(plan.input_shapes)
        return self

    def _install(self, plan: Plan, compile: bool) -> None:
        """Carry out ``plan``: lowered if it recomputes or offloads anything or ``compile`` is set."""
        from memopt.runtime.compiled import lower_compiled
        from memopt.runtime.eager import lower_eager

        self._compile = compile
        if compile and plan.update_in_backward:
            raise MemoptError("this plan updates each parameter inside backward, which the Inductor lowering does not "
                              "carry out yet: use compile=False (the eager lowering), or a larger budget or a leaner "
                              "optimizer (optimizer='galore-adamw8bit' or 'apollo-mini') so the gradients fit")
        if compile or plan.needs_runtime:
            self._plan = plan
            self.runtime = (lower_compiled if compile else lower_eager)(self.model, self._plan)
            self.runtime.update_owner = self._update_owner
        else:
            self._plan, self.runtime = plan, None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def make_optimizer(self, lr: float | None = None, **options: Any) -> torch.optim.Optimizer:
        """The optimizer the plan counted (``plan.optimizer`` with ``plan.optimizer_options``) over the
        trainable parameters, as one parameter group: ``opt = model.make_optimizer(lr=2e-4)``; HF
        Trainer takes it as ``optimizers=(opt, scheduler)``. ``options`` may set what does not change
        the optimizer's memory (``betas``, ``eps``, ``weight_decay``, ...); a memory-changing one
        that differs from the plan's (``rank``, ``foreach``) is an error: plan again with it instead.

        When the plan updates inside backward (``plan.update_in_backward``), the optimizer is the
        per-parameter form of the one planned (``memopt.optim.lowrank``; for ``"adamw"`` torch's
        AdamW arithmetic, parameter by parameter) and is attached to the model: every backward
        updates each parameter as soon as its gradient is complete and frees the gradient; its
        ``step()`` only closes the step (call it after each backward, as usual; schedulers work on
        it). One backward per step — gradient accumulation is an error — unless the plan's optimizer
        accumulates (``optimizer_options={"accumulate": True}`` with ``galore-adamw(8bit)``: each
        backward adds its projected gradients, ``step()`` updates). Clipping is per parameter,
        ``max_grad_norm=`` here (``clip_grad_norm_`` after backward finds no gradients left). The
        latest optimizer made is the one attached.

        With ``method="rso"`` its ``step()`` also ends each subproblem on time (every
        ``resample_every`` steps: B·P folded into W, B and its state reset, a new P drawn;
        ``memopt.passes.rso``)."""
        from memopt.optim import build

        # the lr planned with the optimizer's options, else 1e-3
        lr = lr if lr is not None else self.plan.optimizer_options.get("lr", 1e-3)
        max_grad_norm = options.pop("max_grad_norm", None)
        in_backward_plan = self.plan.update_in_backward
        if max_grad_norm is not None and not in_backward_plan:
            raise TypeError("max_grad_norm is for plans that update inside backward; clip with "
                            "torch.nn.utils.clip_grad_norm_ before optimizer.step() as usual")
        # every parameter that may train: under layerwise sampling, the blocks frozen now too
        params = layerwise.candidates(self.model) or [p for p in self.model.parameters() if p.requires_grad]
        # trainable int8 weights: only memopt's per-parameter update can write them
        per_parameter = in_backward_plan or any(is_handle(p) for p in params)
        opt = build(self.plan.optimizer, params, self.plan.optimizer_options, per_parameter=per_parameter, lr=lr,
                    **options)
        if in_backward_plan:
            opt.max_grad_norm = max_grad_norm
            self._route_updates(opt)
        # layerwise sampling switches blocks after the period's last step (and the blocks drawn get the
        # updates inside backward); RSO's subproblems end after the step that completes them
        layerwise.attach(opt, self.model, (lambda: self._route_updates(opt)) if in_backward_plan else None)
        return rso.attach(opt, self.model)

    def _route_updates(self, opt: torch.optim.Optimizer) -> None:
        """Send each trainable parameter's gradient to ``opt`` inside backward (``in_backward.attach``)."""
        in_backward.attach(self._update_owner, opt, list(dict(self.model.named_parameters()).values()))

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; tied parameters count once."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line summary: trainable, all, and their ratio."""
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def save_pretrained(self, directory: Any, **ignored: Any) -> Any:
        """Write what was trained, and what rebuilds the rest, to ``directory`` (``memopt.checkpoint``):
        never the frozen base weights. LoRA is written in PEFT's format. Reload with
        ``memopt.from_pretrained(base_model, directory)``; for a full model, ``merge(inplace=False)``
        and save that. Keyword arguments of HF's ``save_pretrained`` are accepted and ignored."""
        from memopt.checkpoint import save_pretrained

        if self._merged:
            raise MemoptError("this OptimizedModel was merged; save the plain model merge() returned")
        if self._config is None:
            raise MemoptError("this OptimizedModel was not made by memopt.optimize / from_pretrained: its method "
                              "options are unknown, so it cannot be saved in a form that rebuilds it")
        if ignored:
            log.info("memopt: save_pretrained ignores %s (only the trained tensors are written)", sorted(ignored))
        return save_pretrained(self, directory, *self._config)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the original model's function (LoRA's updates off,
        PaCA's original columns, S²FT's base weights) — e.g. a DPO reference model's logits."""
        from memopt.passes.base import WrappedLinear

        if rso.rso_layers(self.model) or layerwise.sampler_of(self.model) is not None:
            raise MemoptError(f"{self.plan.method} trains the weights themselves, so there is no adapter to switch "
                              "off: keep a copy of the base model for the original function (e.g. a DPO reference)")
        layers = [m for m in self.model.modules() if isinstance(m, WrappedLinear) and hasattr(m, "enabled")]
        before = [m.enabled for m in layers]
        for m in layers:
            m.enabled = False
        try:
            yield
        finally:
            for m, flag in zip(layers, before):
                m.enabled = flag

    def merge(self, inplace: bool = True) -> nn.Module:
        """Fold the trained parameterization back into a plain model and return it.

        ``inplace=True``: the wrapped module is changed in place (adapter layers replaced by their
        merged base layers, parameters given back the ``requires_grad`` flags they had before
        ``optimize``) and this wrapper cannot be used afterwards. ``inplace=False``: a merged copy
        is returned (its memory is a second model's) and this model is left as it is, trainable.

        A base weight adapted through more than one layer (tied or shared) cannot hold two updates:
        ``MemoptError`` names the layers.
        """
        if self._merged:
            raise MemoptError("merge() was already called on this model")
        _refuse_shared_bases(self.model)
        if not inplace:
            import copy

            clone = copy.deepcopy(self.model)
            flags = {id(c): self._original_requires_grad.get(id(p))
                     for p, c in zip(self.model.parameters(), clone.parameters())}
            return _merged(self._merge_fn(clone), flags)
        self.runtime = None
        plain = _merged(self._merge_fn(self.model), self._original_requires_grad)
        self._merged = True
        return plain

    def merge_and_unload(self) -> nn.Module:
        """PEFT's name for ``merge()``."""
        return self.merge()


def _merged(plain: nn.Module, flags: dict[int, bool | None]) -> nn.Module:
    cut_ce.uninstall(plain)
    seq_chunk.uninstall(plain)
    for p in plain.parameters():
        flag = flags.get(id(p))
        if flag is not None:
            p.requires_grad_(flag)
    _restore_save(plain)
    return plain


def _refuse_shared_bases(model: nn.Module) -> None:
    from memopt.checkpoint import stored_weight
    from memopt.passes.base import WrappedLinear

    by_weight: dict[int, list[str]] = {}
    held = []  # the weights stay referenced, so no id is reused while grouping
    for name, m in model.named_modules(remove_duplicate=False):
        weight = stored_weight(m.base_layer) if isinstance(m, WrappedLinear) else None
        if weight is not None:
            held.append(weight)
            by_weight.setdefault(id(weight), []).append(name)
    shared = [names for names in by_weight.values() if len(names) > 1]
    if shared:
        raise MemoptError(
            "cannot merge: one base weight is adapted through several layers ("
            + "; ".join(" and ".join(names) for names in shared)
            + "), each with its own trained update, and one weight cannot hold both. Keep the OptimizedModel "
            "(save_pretrained writes the updates), or exclude all but one of them when optimizing "
            "(exclude_modules=...)")


def _route_save(owner: "weakref.ref[OptimizedModel]", directory: Any, *args: Any, **kwargs: Any) -> Any:
    """The wrapped model's own ``save_pretrained``, routed to the OptimizedModel's: the model's
    would write adapter key names that its ``from_pretrained`` does not know (the trained work
    would reload as random weights)."""
    optimized = owner()
    if optimized is None or optimized._merged:
        raise MemoptError("this model was rewritten by memopt; save the OptimizedModel (save_pretrained) or the "
                          "plain model merge() returned")
    log.warning("memopt: %s.save_pretrained on a model rewritten by memopt writes only the trained tensors, through "
                "OptimizedModel.save_pretrained (reload with memopt.from_pretrained(base_model, dir)); for a full "
                "checkpoint save optimized.merge(inplace=False)", type(optimized.model).__name__)
    return optimized.save_pretrained(directory, *args, **kwargs)


def _restore_save(model: nn.Module) -> None:
    if "save_pretrained" in model.__dict__:
        del model.__dict__["save_pretrained"]


@functools.lru_cache(maxsize=None)
def _class_for(model_cls: type) -> type:
    """A subclass of OptimizedModel whose forward reports ``model_cls.forward``'s signature."""

    def forward(self: OptimizedModel, *args: Any, **kwargs: Any) -> Any:
        return OptimizedModel.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(model_cls.forward)  # type: ignore[attr-defined]
    forward.__doc__ = model_cls.forward.__doc__
    name = f"Optimized{model_cls.__name__}"
    return type(name, (OptimizedModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _offloads_here(model: nn.Module) -> bool:
    """Does a lowered step of ``model`` move offloaded tensors off its device? On a GPU it copies them
    to host memory; on fake or meta tensors it counts them as moved (memopt.runtime.partition); on
    a CPU they stay where they are."""
    return _device_of(model).type in ("cuda", "meta") or isinstance(next(model.parameters(), None), FakeTensor)


def _unit_dims(bound: inspect.BoundArguments) -> tuple:
    """Which dimensions of each tensor input are 1 (a trace specializes them)."""
    return tuple((name, tuple(s == 1 for s in t.shape)) for name, t in tensor_inputs(bound).items())


def _larger(shapes: dict[str, tuple[int, ...]], planned: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    return {name: (shape, tuple(planned[name])) for name, shape in shapes.items()
            if name in planned and any(s > p for s, p in zip(shape, planned[name]))}


def _state_change(plan: Plan, training: bool, autocast: str | None) -> str:
    parts = []
    if plan.training != training:
        parts.append(f"the model is in {'train' if training else 'eval'} mode, the plan was made in "
                     f"{'train' if plan.training else 'eval'} mode")
    if plan.autocast != autocast:
        parts.append(f"autocast is {autocast or 'off'}, the plan was made with autocast {plan.autocast or 'off'}")
    return "; ".join(parts)


def wrap(model: nn.Module, plan: Plan, merge_fn: Callable[[nn.Module], nn.Module],
         original_requires_grad: dict[int, bool], runtime: Any = None, config: Any = None) -> OptimizedModel:
    optimized = _class_for(type(model))(model, plan, merge_fn, original_requires_grad, runtime, config)
    if callable(getattr(model, "save_pretrained", None)):
        object.__setattr__(model, "save_pretrained", functools.partial(_route_save, weakref.ref(optimized)))
    return optimized
