"""Memory-lean Adam variants: 8-bit states (``AdamW8bit``), gradient low-rank projection (``GaLoreAdamW``,
``GaLoreAdamW8bit``) and random-projection scaling (``Apollo``, ``ApolloMini``).

Each is a ``torch.optim.Optimizer`` usable on its own. Shared semantics, stated once:

* **One update per parameter, ``update(p, grad)``**, which ``step()`` runs for every parameter with a
  gradient. Gradient accumulation is the caller's (sum micro-batch gradients into ``.grad``, step at
  the boundary); clipping ``.grad`` before ``step()`` clips what the update reads.
* **Weight decay is decoupled and applied first**, as torch's AdamW: W ← W·(1 − lr·wd), then the
  update with the same lr (the GaLore reference decays after the update with the raw lr).
* **The step count is per parameter** (``state["step"]``, a Python int), so a parameter that got no
  gradient for a while resumes its own bias correction and refresh schedule.
* **State dicts hold tensors and numbers only** (projections as tensors, APOLLO's as seeds):
  ``torch.load(weights_only=True)`` restores them and a resumed run makes the same updates.
* **Parameters a projection does not fit** (fewer than two dimensions, or a rank not below the
  smaller side) get torch AdamW's update exactly (``fallback`` lists them by index with why);
  8-bit optimizers keep states of parameters under ``MIN_8BIT_SIZE`` elements in full precision, as
  bitsandbytes does.

GaLore at its step t = 1, 2, …, for W (m×n) and gradient G: when (t−1) is a multiple of
``update_proj_gap``, SVD of G in fp32 → P = Vh[:r] (m ≥ n) or U[:, :r]; R = G·Pᵀ or Pᵀ·G; Adam
moments of R (carried over across refreshes); N = M̂ / (√V̂ + ε); W ← W − lr·scale·(N·P or P·N).

APOLLO: a Gaussian projection P (entries N(0, 1/r)) drawn from a per-parameter seed, redrawn every
``update_proj_gap`` steps (only the seed is state), projects G along its smaller side; Adam moments
of R = P·G (or G·Pᵀ); the raw gradient is scaled per channel of the larger side by
s = ‖Ñ‖ / ‖R‖ over that channel (``ApolloMini``: one factor for the tensor, rank 1), limited to a
norm growth of ``norm_growth_limit`` per step, times ``scale``.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.linalg import vector_norm

from memopt.optim import blockwise8
from memopt.passes.int8train import int8_master, is_handle, requantize

__all__ = ["MIN_8BIT_SIZE", "AdamW", "AdamW8bit", "Apollo", "ApolloMini", "GaLoreAdamW", "GaLoreAdamW8bit"]

MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller states stay in full precision
CHUNK = 1 << 22  # elements of 8-bit states updated at once (a multiple of the block): bounds the fp32 transients
_ZERO_SIGNED = int(blockwise8.dynamic_map(True).tolist().index(0.0))  # the signed code of 0 (first of its zeros)


class _LeanAdam(torch.optim.Optimizer):
    """What the variants share: validation, the step loop, Adam moments in full precision or 8 bits."""

    eight_bit = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        _check_group(defaults)
        super().__init__(params, defaults)
        self._updated: set[int] = set()  # parameters updated inside this backward (by id), until step()
        self.max_grad_norm: float | None = None  # inside backward: each gradient clipped to this norm

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_group({**self.defaults, **param_group})  # the group's own values, defaults filled in
        super().add_param_group(param_group)

    @property
    def fallback(self) -> dict[int, str]:
        """Parameter index (over all groups, in order) -> why it gets AdamW's update."""
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        return {i: why for i, (p, g) in enumerate(params) if (why := self.not_projected(p.shape, g.get("rank")))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that each state tensor keeps the dtype it was saved with (torch casts every
        one to its parameter's dtype: 8-bit codes would become floats, fp32 absmaxes bf16)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)

    @staticmethod
    def not_projected(shape: torch.Size | tuple[int, ...], rank: int | None) -> str | None:
        """Why a parameter of ``shape`` gets AdamW's update instead of a projected one (None: it is projected)."""
        if rank is None:
            return None
        if len(shape) != 2:
            return f"{len(shape)}-D, not a matrix"
        if rank >= min(shape):
            return f"rank {rank} is not below its smaller side {min(shape)}"
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, p.grad, group)
                elif group.get("accumulate") and self.state[p].get("pending"):  # accumulated inside backward
                    self._apply_accumulated(p, group)  # (pending is state: a resumed window steps too)
        self._updated.clear()
        return loss

    @torch.no_grad()
    def update_in_backward(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """``update(p, grad)`` run inside the backward, as soon as ``grad`` is complete: each
        parameter once per optimizer step. Clipping can only be per parameter here (no global norm
        exists while gradients never coexist): ``max_grad_norm`` scales each gradient to at most that
        norm. A second backward before ``step()`` is gradient accumulation: an error, unless the
        optimizer accumulates (GaLore's ``accumulate=True``: each backward adds its projected
        gradient, ``step()`` updates)."""
        group = self._group_of(p)
        if group.get("accumulate"):
            self._updated.add(id(p))
            self._accumulate(p, grad, group)
            return
        if id(p) in self._updated:
            raise RuntimeError(
                "a parameter was updated inside backward twice without optimizer.step() between: this looks like "
                "gradient accumulation, which updates inside backward cannot do (every backward updates the "
                "weights). Call optimizer.step() after each backward with one micro-batch per step; plan with "
                "optimizer='galore-adamw' or 'galore-adamw8bit' and optimizer_options={'accumulate': True} (it "
                "accumulates the projected gradients inside backward and updates at step()); or plan without "
                "updates inside backward: memopt.optimize(..., planner=memopt.PlannerConfig("
                "allow_update_in_backward=False)) with a larger budget")
        self._updated.add(id(p))
        if self.max_grad_norm is not None:
            norm = vector_norm(grad, dtype=torch.float32)
            grad = grad * (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype)
        self.update(p, grad)

    @torch.no_grad()
    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any] | None = None) -> None:
        """Apply this optimizer's update to ``p`` given its (complete) gradient ``grad``."""
        group = group or self._group_of(p)
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if group.get("accumulate"):  # one micro-batch: the accumulating path with one gradient
            self._accumulate(p, grad, group)
            self._apply_accumulated(p, group)
            return
        state = self.state[p]
        self._init_state(p, state, group)
        state["step"] = state.get("step", 0) + 1
        with self._writable(p, state) as target:
            grad = grad.to(target.dtype)
            if group["weight_decay"]:
                target.mul_(1 - group["lr"] * group["weight_decay"])
            if self._projects(target, group):
                self._projected_update(target, grad, state, group)
            else:
                self._adamw_update(target, grad, state, group)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """State the update needs the parameter itself for (not the copy a trainable int8 weight is updated in)."""

    @contextlib.contextmanager
    def _writable(self, p: torch.Tensor, state: dict[str, Any]) -> Iterator[torch.Tensor]:
        """What the update writes into: ``p``; for the handle of a trainable int8 weight
        (``memopt.passes.int8train``), an fp32 copy of its W, written back by stochastic rounding
        (noise seeded by the parameter's index and step: a resumed run rounds alike). On fake tensors
        (a simulated step) a stand-in copy is updated and requantized, and nothing written."""
        master = int8_master(p)
        if master is None and not is_handle(p):
            yield p
            return
        target = master.dequantized_weight(torch.float32) if master is not None else \
            torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        yield target
        index = self._index(p)
        generator = None
        if master is not None:
            generator = torch.Generator(device=target.device)
            generator.manual_seed(zlib.crc32(f"int8:{index}:{state['step']}".encode()))
        codes, scales = requantize(target, generator)
        del target
        if master is not None:
            master.qweight.copy_(codes)
            master.qscales.copy_(scales)

    def _accumulate(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not accumulate gradients")

    def _apply_accumulated(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not accumulate gradients")

    def _index(self, p: torch.Tensor) -> int:
        """``p``'s position over all parameter groups, in order (what seeds its randomness)."""
        return next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("the tensor is not a parameter of this optimizer")

    def _projects(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return "rank" in group and self.not_projected(p.shape, group["rank"]) is None

    # ------------------------------------------------------------------ Adam moments

    def _eight_bit_for(self, like: torch.Tensor) -> bool:
        return self.eight_bit and like.numel() >= MIN_8BIT_SIZE

    def _adam_chunks(self, r: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
                     ) -> Iterator[tuple[slice, torch.Tensor]]:
        """The moments of ``r`` updated (and stored), yielding N = (M / (1 − β1ᵗ)) / (√(V / (1 − β2ᵗ)) + ε)
        over slices of ``r``'s elements (flattened): all at once in full precision; in 8 bits, chunk
        by chunk, so the fp32 working copies of the moments never exceed ``CHUNK`` elements."""
        beta1, beta2 = group["betas"]
        t = state["step"]
        bc1, bc2 = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
        if not self._eight_bit_for(r):
            m, v = _moments(state, r)
            m.lerp_(r, 1 - beta1)
            v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
            yield slice(None), (m / bc1).div_((v.sqrt() / bc2).add_(group["eps"]))
            return
        numel, flat = r.numel(), r.reshape(-1)
        if "exp_avg_q" not in state:
            blocks = -(-numel // blockwise8.BLOCK)
            state["exp_avg_q"] = torch.full((numel,), _ZERO_SIGNED, dtype=torch.uint8, device=r.device)
            state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=r.device)
            state["exp_avg_sq_q"] = torch.zeros(numel, dtype=torch.uint8, device=r.device)
            state["exp_avg_sq_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=r.device)
        for start in range(0, numel, CHUNK):
            part = slice(start, min(start + CHUNK, numel))
            blocks = slice(start // blockwise8.BLOCK, -(-part.stop // blockwise8.BLOCK))
            m_q, m_max = state["exp_avg_q"][part], state["exp_avg_absmax"][blocks]
            v_q, v_max = state["exp_avg_sq_q"][part], state["exp_avg_sq_absmax"][blocks]
            g = flat[part].float()
            m = blockwise8.dequantize(m_q, m_max, True, g.shape).lerp_(g, 1 - beta1)
            v = blockwise8.dequantize(v_q, v_max, False, g.shape).mul_(beta2).addcmul_(g, g, value=1 - beta2)
            del g
            blockwise8.quantize(m, True, out=(m_q, m_max))
            blockwise8.quantize(v, False, out=(v_q, v_max))
            yield part, m.div_(bc1).div_(v.sqrt_().div_(bc2).add_(group["eps"]))
            del m, v

    def _adam_direction(self, r: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """N for all of ``r`` (fp32 in 8 bits, else ``r``'s dtype), the moments updated and stored."""
        chunks = self._adam_chunks(r, state, group)
        if not self._eight_bit_for(r):
            return next(chunks)[1]
        out = torch.empty(r.shape, dtype=torch.float32, device=r.device)
        flat = out.view(-1)
        for part, n in chunks:
            flat[part] = n
        return out

    def _adamw_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """torch AdamW's update (weight decay already applied): the same operations in the same order."""
        if self._eight_bit_for(p):
            if p.is_contiguous():
                flat = p.view(-1)
                for part, n in self._adam_chunks(grad, state, group):
                    flat[part].add_(n.to(p.dtype), alpha=-group["lr"])
            else:  # elements in logical order, as the gradient's flattening
                p.add_(self._adam_direction(grad, state, group).to(p.dtype).view(p.shape), alpha=-group["lr"])
            return
        beta1, beta2 = group["betas"]
        t = state["step"]
        exp_avg, exp_avg_sq = _moments(state, p)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / ((1 - beta2 ** t) ** 0.5)).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-(group["lr"] / (1 - beta1 ** t)))

    def _projected_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                          group: dict[str, Any]) -> None:
        raise NotImplementedError


def _moments(state: dict[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-precision moments (``exp_avg``, ``exp_avg_sq``) of ``state``, made as zeros like ``like`` at first."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
    return state["exp_avg"], state["exp_avg_sq"]


def _check_group(group: dict[str, Any]) -> None:
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not (eps >= 0 and wd >= 0):
        raise ValueError(f"eps and weight_decay must be >= 0, got eps={eps!r}, weight_decay={wd!r}")
    for name in ("rank", "update_proj_gap"):
        value = group.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    limit = group.get("norm_growth_limit", 2.0)
    if not limit > 1.0:
        raise ValueError(f"norm_growth_limit must be > 1, got {limit!r}")


class AdamW(_LeanAdam):
    """torch's AdamW, parameter by parameter (the same operations in the same order as
    ``torch.optim.AdamW(foreach=False)``), with ``update(p, grad)``: the optimizer the plan counts
    when it updates each parameter inside backward (``optimizer="adamw"``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))


class AdamW8bit(_LeanAdam):
    """AdamW with both moments stored blockwise in 8 bits (``blockwise8``): 2 bytes per parameter
    (plus an fp32 absmax per 256) instead of 8; the update is computed in fp32 per parameter."""

    eight_bit = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))


class GaLoreAdamW(_LeanAdam):
    """GaLore (Zhao et al., 2024): Adam in the span of the gradient's top-``rank`` singular vectors.

    ``accumulate=True`` accumulates gradients in the projection (for updates inside backward with
    gradient accumulation, where no full gradient may wait for ``step()``): each gradient handed over
    (``update_in_backward``) is projected and added to the fp32 ``accumulated`` state ([m, r] or
    [r, n]; a parameter that is not projected accumulates its whole gradient); ``step()`` updates from
    the sum. Since projecting is linear, this equals GaLore on the summed gradient while the
    projector stays. A refresh is due at the window's first gradient: its projector comes from that
    micro-batch's gradient (the sum does not exist yet), not from the window's sum — the one
    difference from one large batch, on refresh steps only. ``max_grad_norm`` then clips the
    accumulated gradient (projected: its norm within the subspace) at ``step()``."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, accumulate: bool = False) -> None:
        if not isinstance(accumulate, bool):
            raise ValueError(f"accumulate must be True or False, got {accumulate!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale, accumulate=accumulate))

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """The projector from ``grad``'s top-``rank`` singular vectors (SVD in fp32), in place once made."""
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        projector = (vh[:group["rank"]] if p.shape[0] >= p.shape[1] else u[:, :group["rank"]]).to(p.dtype)
        del u, vh
        if "projector" in state:
            state["projector"].copy_(projector)
        else:
            state["projector"] = projector.contiguous()

    @staticmethod
    def _project(p: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        grad = grad.to(proj.dtype)
        return grad @ proj.t() if p.shape[0] >= p.shape[1] else proj.t() @ grad  # [m, r] or [r, n]

    def _step_along(self, p: torch.Tensor, low: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        proj = state["projector"].to(p.dtype)  # a trainable int8 weight's fp32 copy: the projector cast
        direction = self._adam_direction(low, state, group).to(p.dtype)
        p.add_(direction @ proj if p.shape[0] >= p.shape[1] else proj @ direction, alpha=-group["lr"] * group["scale"])

    def _projected_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                          group: dict[str, Any]) -> None:
        if (state["step"] - 1) % group["update_proj_gap"] == 0:
            self._refresh(p, grad, state, group)
        low = self._project(p, grad, state["projector"])
        self._step_along(p, low, state, group)

    def _accumulate(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        projects = self._projects(p, group)
        if not state.get("pending"):  # the window's first gradient
            if projects and state.get("step", 0) % group["update_proj_gap"] == 0:  # the coming step refreshes
                self._refresh(p, grad, state, group)
            state["pending"] = True
        low = self._project(p, grad, state["projector"]) if projects else grad
        if "accumulated" not in state:
            state["accumulated"] = torch.zeros(low.shape, dtype=torch.float32, device=low.device)
        state["accumulated"].add_(low)

    def _apply_accumulated(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state.get("pending"):
            return
        total = state["accumulated"]
        if self.max_grad_norm is not None:
            total.mul_((self.max_grad_norm / (vector_norm(total) + 1e-6)).clamp(max=1.0))
        state["step"] = state.get("step", 0) + 1
        with self._writable(p, state) as target:
            if group["weight_decay"]:
                target.mul_(1 - group["lr"] * group["weight_decay"])
            low = total.to(target.dtype)
            if self._projects(target, group):
                self._step_along(target, low, state, group)
            else:
                self._adamw_update(target, low, state, group)
            del low
        total.zero_()
        state["pending"] = False


class GaLoreAdamW8bit(GaLoreAdamW):
    """``GaLoreAdamW`` with its low-rank moments stored blockwise in 8 bits (GaLore's 8-bit variant)."""

    eight_bit = True


class Apollo(_LeanAdam):
    """APOLLO (Zhu et al., 2024): Adam moments of a random projection of the gradient set a
    per-channel scaling of the raw gradient. ``scale_type``: ``"channel"`` (APOLLO) or ``"tensor"``."""

    scale_type = "channel"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 256, update_proj_gap: int = 200,
                 scale: float = 1.0, norm_growth_limit: float = 1.01, seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale,
                                      norm_growth_limit=norm_growth_limit, seed=seed))

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """The parameter's seed (a number: weights_only-safe): the group's ``seed`` and the parameter's
        index over all groups."""
        if "seed" not in state:
            index = self._index(p)
            state["seed"] = zlib.crc32(f"{group['seed']}:{index}".encode())

    def _projection(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """P [r, min(m, n)], N(0, 1/r), drawn from the parameter's seed (``_init_state``) and its refresh index."""
        r = group["rank"]
        refresh = (state["step"] - 1) // group["update_proj_gap"]
        gen = torch.Generator(device="cpu").manual_seed((state["seed"] * 1_000_003 + refresh) % (2 ** 63))
        proj = torch.randn(r, min(p.shape), generator=gen, dtype=torch.float32) / math.sqrt(r)
        return proj.to(device=p.device, dtype=p.dtype)

    def _projected_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                          group: dict[str, Any]) -> None:
        wide = p.shape[0] <= p.shape[1]  # project the smaller side; channels along the larger one
        proj = self._projection(p, state, group)
        low = proj @ grad if wide else grad @ proj.t()  # [r, n] or [m, r]
        direction = self._adam_direction(low, state, group)
        dim = 0 if wide else 1  # the channel's norm runs over the projected side
        f32 = torch.float32  # norms accumulate in fp32 without an fp32 copy of the tensor
        if self.scale_type == "tensor":
            factor = vector_norm(direction, dtype=f32) / vector_norm(low, dtype=f32).clamp_min(1e-12)
        else:
            factor = (vector_norm(direction, dim=dim, keepdim=True, dtype=f32)
                      / vector_norm(low, dim=dim, keepdim=True, dtype=f32).clamp_min(1e-12))
        del low, direction
        update = grad * factor.to(grad.dtype)  # the raw gradient, scaled per channel (or as a whole)
        norm = vector_norm(update, dtype=f32)
        if "prev_norm" in state:  # no limit after a zero update (a zero gradient): nothing to grow from
            prev = state["prev_norm"]
            limit = torch.where(prev > 0, group["norm_growth_limit"] * prev, norm)
            update.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm)).to(update.dtype))
            prev.copy_(torch.minimum(norm, limit))
        else:
            state["prev_norm"] = norm.clone()
        p.add_(update.to(p.dtype), alpha=-group["lr"] * group["scale"])


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, one scaling factor per tensor; ``scale`` √128 (the paper's α = 128,
    applied as its square root as in the authors' code)."""

    scale_type = "tensor"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 1, update_proj_gap: int = 200,
                 scale: float = math.sqrt(128), norm_growth_limit: float = 1.01, seed: int = 0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, norm_growth_limit=norm_growth_limit, seed=seed)
