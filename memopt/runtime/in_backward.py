"""Updates inside backward: each parameter updated as soon as its gradient is complete, and the
gradient freed at once, so no two parameters' gradients need to coexist (``plan.update_in_backward``).

Two paths carry it out, whichever runs the step:

* **The model as it is** (eager autograd): a post-accumulate-grad hook on each trainable parameter
  takes ``p.grad``, sets it to None and runs the optimizer's ``update_in_backward(p, grad)``.
* **The lowered step** (``memopt.runtime.step``): its backward graph returns every gradient at
  once, at its end. ``insert_updates`` rewrites the partitioned backward instead: right after the
  node that makes a parameter's gradient, a call of the opaque op ``memopt::update_in_backward``
  hands it to the optimizer, and the graph returns no gradient for that parameter — so it dies
  there, as the planner priced it (``memopt.planner.problem``: gradients live where made).

``attach(owner, optimizer, params)`` installs both for one model; a newer optimizer replaces the
older one. A step planned with updates inside backward refuses to run without an attached
optimizer (``require``): gradients held until an optimizer step would break the plan's peak.
On fake tensors (a simulated step) the op frees the gradient without updating anything.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.node import has_side_effect

from memopt.errors import MemoptError

__all__ = ["attach", "detach", "insert_updates", "new_owner", "partition_with_updates", "require"]

_OWNERS: dict[int, "_Attached"] = {}
_ids = itertools.count(1)

NO_OPTIMIZER = ("this model's plan updates each parameter inside backward (it fits only that way), but no optimizer "
                "is attached: build it with model.make_optimizer(lr=...) before the first training step")


class _Attached:
    def __init__(self, optimizer: Any, params: list[torch.nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.params = params  # by the step's parameter index (all of the model's, trainable or not)
        self.hooks: list[Any] = []

    def from_graph(self, index: int, grad: torch.Tensor) -> None:
        self.optimizer.update_in_backward(self.params[index], grad)

    def from_hook(self, p: torch.Tensor) -> None:
        if p.grad is None:  # the lowered step handed it over in its graph: autograd accumulated nothing
            return
        grad, p.grad = p.grad, None
        self.optimizer.update_in_backward(p, grad)


def new_owner() -> int:
    """An id for one model's updates (its lowered steps' graphs name it)."""
    return next(_ids)


def attach(owner: int, optimizer: Any, params: list[torch.nn.Parameter]) -> None:
    """Route ``owner``'s gradients to ``optimizer.update_in_backward`` (replacing an earlier one)."""
    if not callable(getattr(optimizer, "update_in_backward", None)):
        raise TypeError(f"{type(optimizer).__name__} cannot update a parameter on its own (no update_in_backward)")
    detach(owner)
    attached = _OWNERS[owner] = _Attached(optimizer, params)
    for p in params:
        if p.requires_grad:
            attached.hooks.append(p.register_post_accumulate_grad_hook(attached.from_hook))


def detach(owner: int) -> None:
    attached = _OWNERS.pop(owner, None)
    if attached is not None:
        for hook in attached.hooks:
            hook.remove()


def require(owner: int) -> None:
    if owner not in _OWNERS:
        raise MemoptError(NO_OPTIMIZER)


@torch.library.custom_op("memopt::update_in_backward", mutates_args=())
def update_in_backward(grad: torch.Tensor, owner: int, index: int) -> torch.Tensor:
    """Hand ``grad`` (parameter ``index`` of ``owner``'s step) to the attached optimizer."""
    attached = _OWNERS.get(owner)
    if attached is None:
        raise MemoptError(NO_OPTIMIZER)
    attached.from_graph(index, grad)
    return grad.new_empty(0)


@update_in_backward.register_fake
def _(grad: torch.Tensor, owner: int, index: int) -> torch.Tensor:
    return grad.new_empty(0)


has_side_effect(torch.ops.memopt.update_in_backward.default)  # never removed as dead code: its result is unused


def is_update(node: fx.Node) -> bool:
    """Is ``node`` an update inside backward (``insert_updates``)? Its args: (grad, owner, index)."""
    return node.op == "call_function" and node.target is torch.ops.memopt.update_in_backward.default


def insert_updates(bw: fx.GraphModule, owner: int, num_params: int) -> None:
    """Rewrite the partitioned backward ``bw``: each parameter gradient (outputs ``0..num_params-1``,
    the step's parameters in order) goes to the optimizer where it is made, and is not returned."""
    output = next(n for n in bw.graph.nodes if n.op == "output")
    outs = list(output.args[0])
    for i in range(min(num_params, len(outs))):
        node = outs[i]
        if isinstance(node, fx.Node):
            with bw.graph.inserting_after(node):
                bw.graph.call_function(torch.ops.memopt.update_in_backward.default, (node, owner, i))
            outs[i] = None
    output.args = (tuple(outs),)
    bw.recompile()


def partition_with_updates(partition: Callable[..., Any], owner: int, num_params: int) -> Callable[..., Any]:
    """``partition`` (torch's partitioner signature), its backward rewritten by ``insert_updates``."""
    def split(joint: fx.GraphModule, inputs: list, **kwargs: Any) -> Any:
        fw, bw = partition(joint, inputs, **kwargs)
        insert_updates(bw, owner, num_params)
        return fw, bw

    return split

