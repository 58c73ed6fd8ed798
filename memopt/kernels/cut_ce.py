"""Cut cross-entropy: the LM head and the token loss as one op that never holds [tokens, vocab] logits.

Design note. ``cut_cross_entropy(h, weight, targets)`` is ``Σ_t CE(h_t·Wᵀ, target_t)`` over the
tokens whose target is not ``ignore_index`` (a sum, in fp32; the caller divides). The tokens are
split into ``chunks`` pieces (``tensor_split``: a fixed count, so a trace with a symbolic token
count covers every length); each piece's logits ``h_c·Wᵀ`` exist only while that piece is worked
on. Forward keeps one fp32 log-sum-exp per token; backward recomputes each piece's logits and turns
them into their gradient ``(softmax − onehot)·g`` row by row, then ``grad_h_c = G·W`` and
``grad_W += Gᵀ·h_c``. So the step holds at most one piece's logits and one piece's gradient instead
of the unfused loss's whole-sequence logits, their fp32 copy, the log-softmax and its gradient.

Numerics follow HF's ``ForCausalLMLoss``: logits in the compute dtype (the head's matmul), the loss
and the softmax in fp32, the logits' gradient cast to the compute dtype before the two GEMMs. Only
the order of the reductions differs (per piece; ``grad_W`` summed over pieces in fp32).

The row-wise part (log-sum-exp and target logit; the gradient) is ``cut_ce_rows`` /
``cut_ce_rows_grad``: a Triton kernel for CUDA (one program per row streaming the vocabulary in
blocks, online max and sum; the gradient one [row, vocab block] tile per program, written once in
the compute dtype), the torch reference elsewhere. Dispatch, interpreter and simulation as in
``memopt.kernels.dequant``: inside ``simulating("cuda")`` each is one custom op whose fake
allocates only its outputs, as the kernel does; a CPU plan traces the reference's own transients.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor

from memopt.kernels.dequant import _SIMULATED
from memopt.kernels.paca import _cdiv, triton_available

try:  # optional: without it the torch reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

__all__ = [
    "CutCrossEntropy", "chunks_for", "cut_ce_rows", "cut_ce_rows_grad", "cut_ce_rows_grad_reference",
    "cut_ce_rows_reference", "cut_ce_rows_grad_triton", "cut_ce_rows_triton", "cut_cross_entropy",
    "cut_cross_entropy_reference", "uses_cut_ce_triton",
]

# One piece's logits are at most this many elements (2**24: 32 MiB in bf16), unless that would make
# more than MAX_CHUNKS pieces (each piece is a few ops in the traced step); and at least MIN_CHUNKS
# pieces, so that even a short sequence never holds all its logits at once.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNKS = 8
MAX_CHUNKS = 256
_BLOCK_V = 1024  # vocabulary entries per Triton block


def chunks_for(tokens: int, vocab: int, trained_hidden: int | None = None) -> int:
    """How many pieces ``tokens`` rows of ``vocab`` logits are cut into.

    ``trained_hidden``: the head's input width when its weight trains. Each piece then adds its
    [vocab, hidden] gradient into one fp32 accumulator — memory traffic of the whole head per piece,
    against matmuls that grow with the piece's rows — so a piece keeps at least hidden / 2 rows
    (measured: 64 pieces of 32 rows took 8.1× the unfused step on the CPU, 8 pieces of 256 rows
    1.15×, hidden 512; 63 pieces of 130 rows 4.08× on an H200 at hidden 4096). Beside that
    accumulator (4 · vocab · hidden bytes) such pieces' logits are small."""
    pieces = max(1, min(tokens, max(MIN_CHUNKS, min(MAX_CHUNKS, _cdiv(tokens * vocab, CHUNK_ELEMENTS)))))
    if trained_hidden:
        pieces = min(pieces, max(1, 2 * tokens // trained_hidden))
    return pieces


# ----------------------------------------------------------------------------- row-wise part


def cut_ce_rows_reference(logits: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, target logit) per row, fp32; an ignored row's target logit is 0, and a target
    outside the vocabulary's is NaN (a loss that shows it, never another number)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != ignore_index
    inside = (targets >= 0) & (targets < x.shape[1])
    picked = x.gather(1, torch.where(valid & inside, targets, 0).unsqueeze(1)).squeeze(1)
    return lse, torch.where(valid, torch.where(inside, picked, float("nan")), 0.0)


def cut_ce_rows_grad_reference(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                               scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``(softmax(row) − onehot(target))·scale`` per row, in the logits' dtype (``scale`` fp32 [rows])."""
    p = logits.float() - lse.unsqueeze(1)  # one fp32 piece (a copy of 16-bit logits), worked on in place
    p = p.exp_().mul_(scale.unsqueeze(1))
    valid = targets != ignore_index
    p = p.scatter_add_(1, torch.where(valid, targets, 0).unsqueeze(1), torch.where(valid, -scale, 0.0).unsqueeze(1))
    return p.to(logits.dtype)


def uses_cut_ce_triton(logits: torch.Tensor) -> bool:
    """Whether the row-wise part runs the Triton kernel: CUDA, triton, fp32/16-bit logits."""
    return logits.is_cuda and triton_available() and logits.dtype in (torch.float32, torch.float16, torch.bfloat16)


def cut_ce_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on CUDA when available, the torch reference otherwise (same contract)."""
    if _as_one_op(logits):
        return tuple(torch.ops.memopt.cut_ce_rows(logits, targets, ignore_index))  # type: ignore[return-value]
    return _eager_rows(logits, targets, ignore_index)


def cut_ce_rows_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                     ignore_index: int) -> torch.Tensor:
    """The Triton kernel on CUDA when available, the torch reference otherwise (same contract)."""
    if _as_one_op(logits):
        return torch.ops.memopt.cut_ce_rows_grad(logits, targets, lse, scale, ignore_index)
    return _eager_rows_grad(logits, targets, lse, scale, ignore_index)


def _as_one_op(x: torch.Tensor) -> bool:
    simulated = _SIMULATED.get()
    if simulated is not None:
        return simulated == "cuda"
    return torch.compiler.is_compiling() or (x.is_cuda and (is_fake(x) or isinstance(x, FunctionalTensor)))


def _eager_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if uses_cut_ce_triton(logits):
        return cut_ce_rows_triton(logits, targets, ignore_index)
    return cut_ce_rows_reference(logits, targets, ignore_index)


def _eager_rows_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                     ignore_index: int) -> torch.Tensor:
    if uses_cut_ce_triton(logits):
        return cut_ce_rows_grad_triton(logits, targets, lse, scale, ignore_index)
    return cut_ce_rows_grad_reference(logits, targets, lse, scale, ignore_index)


@torch.library.custom_op("memopt::cut_ce_rows", mutates_args=())
def _rows_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cut_ce_rows`` as one op (what the kernel is); real tensors run the eager dispatch."""
    lse, picked = _eager_rows(logits, targets, ignore_index)
    return lse, picked


@_rows_op.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = logits.shape[0]
    return logits.new_empty((rows,), dtype=torch.float32), logits.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("memopt::cut_ce_rows_grad", mutates_args=())
def _rows_grad_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                  ignore_index: int) -> torch.Tensor:
    """``cut_ce_rows_grad`` as one op (what the kernel is); real tensors run the eager dispatch."""
    return _eager_rows_grad(logits, targets, lse, scale, ignore_index)


@_rows_grad_op.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
      ignore_index: int) -> torch.Tensor:
    return torch.empty_like(logits)  # the gradient: all the kernel allocates


def cut_ce_rows_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                       block_v: int = _BLOCK_V) -> tuple[torch.Tensor, torch.Tensor]:
    """``cut_ce_rows_reference``'s contract: one program per row, the vocabulary streamed in blocks."""
    rows, vocab = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    picked = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        _rows_kernel()[(rows,)](logits, targets, lse, picked, vocab, logits.stride(0), ignore_index, BLOCK_V=block_v)
    return lse, picked


def cut_ce_rows_grad_triton(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                            ignore_index: int, block_v: int = _BLOCK_V) -> torch.Tensor:
    """``cut_ce_rows_grad_reference``'s contract: one [row, vocabulary block] tile per program."""
    rows, vocab = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    out = torch.empty((rows, vocab), device=logits.device, dtype=logits.dtype)
    if rows:
        _grad_kernel()[(rows, _cdiv(vocab, block_v))](
            logits, targets, lse, scale, out, vocab, logits.stride(0), out.stride(0), ignore_index, BLOCK_V=block_v)
    return out


@functools.cache
def _rows_kernel() -> Any:
    return triton.jit(_cut_ce_rows_kernel)


@functools.cache
def _grad_kernel() -> Any:
    return triton.jit(_cut_ce_rows_grad_kernel)


def _cut_ce_rows_kernel(x_ptr, t_ptr, lse_ptr, picked_ptr, V, stride_x, IGNORE, BLOCK_V: tl.constexpr):
    """Row ``pid``: online max and sum of exp over the vocabulary, and the target's logit."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per lane: running max and sum of exp(x - max)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, tl.cdiv(V, BLOCK_V)):
        cols = v0 * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        scale_old = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
        s = s * scale_old + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
        m = m_new
    top = tl.max(m, axis=0)
    total = tl.sum(s * tl.where(m == float("-inf"), 0.0, tl.exp(m - top)), axis=0)
    tl.store(lse_ptr + row, top + tl.log(total))
    target = tl.load(t_ptr + row)
    valid = target != IGNORE
    inside = (target >= 0) & (target < V)  # outside the vocabulary: NaN, as the reference
    picked = tl.load(base + tl.where(valid & inside, target, 0)).to(tl.float32)
    tl.store(picked_ptr + row, tl.where(valid, tl.where(inside, picked, float("nan")), 0.0))


def _cut_ce_rows_grad_kernel(x_ptr, t_ptr, lse_ptr, scale_ptr, g_ptr, V, stride_x, stride_g, IGNORE,
                             BLOCK_V: tl.constexpr):
    """Tile (row, vocabulary block): ``(exp(x − lse) − [col == target])·scale``, cast to the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < V
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    target = tl.load(t_ptr + row)
    p = tl.exp(x - lse) - tl.where((cols == target) & (target != IGNORE), 1.0, 0.0)
    tl.store(g_ptr + row * stride_g + cols, (p * scale).to(g_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------- the fused op


class CutCrossEntropy(torch.autograd.Function):
    """Σ over valid tokens of CE(h·Wᵀ, target), fp32; see the module's design note."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunks: int) -> torch.Tensor:
        lses, total = [], None
        for hc, tc in zip(h.tensor_split(chunks), targets.tensor_split(chunks)):
            lse, picked = cut_ce_rows(hc @ weight.t(), tc, ignore_index)  # the piece's logits die here
            part = torch.where(tc != ignore_index, lse - picked, 0.0).sum()
            total = part if total is None else total + part
            lses.append(lse)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.ignore_index, ctx.chunks = ignore_index, chunks
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ignore = ctx.ignore_index
        grad_h, grad_w = [], None
        pieces = zip(h.tensor_split(ctx.chunks), targets.tensor_split(ctx.chunks), lse.tensor_split(ctx.chunks))
        for hc, tc, lc in pieces:
            scale = torch.where(tc != ignore, grad.float(), 0.0)
            g = cut_ce_rows_grad(hc @ weight.t(), tc, lc, scale, ignore)  # recomputed logits -> their gradient
            if want_h:
                grad_h.append(g @ weight)
            if want_w:
                part = g.t() @ hc
                grad_w = part.float() if grad_w is None else grad_w + part
        return (
            (grad_h[0] if len(grad_h) == 1 else torch.cat(grad_h)) if want_h else None,
            grad_w.to(weight.dtype) if want_w else None,
            None, None, None,
        )


# A traced step may hold the assert above where torch's partitioner accepts it beside recomputation
# (torch 2.13 on); before, the assert is made only on real tensors, and in a traced step the row
# kernels make such a target's loss NaN (never another number).
_ASSERTS_TRACE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def cut_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      chunks: int | None = None) -> torch.Tensor:
    """Σ of the token losses of ``h`` [tokens, hidden] under the head ``weight`` [vocab, hidden] (fp32).

    ``targets`` [tokens] are class indices or ``ignore_index``. ``chunks``: pieces the tokens are cut
    into (default ``chunks_for(tokens, vocab, hidden if the weight trains)``)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"cut_cross_entropy: h {list(h.shape)} and weight {list(weight.shape)} must be "
                         "[tokens, hidden] and [vocab, hidden]")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"cut_cross_entropy: targets {list(targets.shape)} must be [tokens] = [{h.shape[0]}]")
    vocab = weight.shape[0]
    if _ASSERTS_TRACE or not (is_fake(targets) or torch.compiler.is_compiling()):
        torch._assert_async(((targets == ignore_index) | ((targets >= 0) & (targets < vocab))).all(),
                            f"cut_cross_entropy: a target is outside [0, {vocab}) and is not "
                            f"ignore_index={ignore_index}")
    if chunks is None:
        chunks = chunks_for(int(h.shape[0]), int(vocab), int(h.shape[1]) if weight.requires_grad else None)
    return CutCrossEntropy.apply(h, weight, targets.long(), ignore_index, chunks)


def cut_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                ignore_index: int = -100) -> torch.Tensor:
    """The unfused sum: logits in h's dtype, ``cross_entropy`` in fp32 (HF's ``ForCausalLMLoss``)."""
    logits = (h @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")
