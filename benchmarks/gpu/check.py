"""The GPU check kit: one script, one table, the ground truth for kernels, the allocator and streams.

Run it whenever a GPU is at hand (≤ 8 minutes on one H100/H200); ``--cpu-smoke`` runs the same code
at toy sizes on the CPU (CI runs it, so the kit cannot rot; under ``TRITON_INTERPRET=1`` the Triton
kernels run through Triton's interpreter):

    python benchmarks/gpu/check.py                        # on a GPU
    TRITON_INTERPRET=1 python benchmarks/gpu/check.py --cpu-smoke

Checks, one row each (``ok`` or ``FAIL`` and the numbers):

1. **kernels** — the PaCA and dequant-matmul (NF4, int8) Triton kernels against their torch
   references in fp16 and bf16 (fp32 in the smoke run): max error relative to the output's scale,
   and time against the reference (a ratio; GPU only, CUDA events).
2. **planned steps** — a Llama (a 1B one's width on a GPU: hidden 2048, 8 layers, batch 1 × 2048;
   toy in the smoke run) planned by ``memopt.optimize`` at three budgets (the smallest feasible,
   between, and keeping everything): the real step's peak — ``torch.cuda.max_memory_allocated`` above what was
   allocated before it, on a GPU; memopt's tracker on the CPU — against the plan's prediction, and
   the step time against HF gradient checkpointing on the same model.
3. **offload** — a plan that offloads, on CUDA: its step time against the plan's prediction of
   exposed copy time (a failed overlap shows as time, not memory). Skipped without CUDA.
4. **compiled** — a planned step through Inductor (``compile=True``; the same width, 4 layers on a
   GPU): peak against the plan.
5. **QLoRA long context** — NF4 LoRA r32 with cut cross-entropy on Llama-3.1-8B's shapes (8 of its
   32 layers: planning all 32 at this length takes ~7 minutes; random weights) at 32,768 tokens,
   planned for 80 GiB: real peak against predicted (GPU; a toy NF4 model in the smoke run).

6. **cut cross-entropy** — the row kernels (log-sum-exp, gradient) against the torch reference, and
   the fused op (``cut_cross_entropy``) against the unfused head + ``cross_entropy`` at
   8192 tokens × vocab 128256 (toy in the smoke run): loss and gradient error, the real peak of
   each (``torch.cuda.max_memory_allocated`` on a GPU, memopt's tracker on the CPU) and the time ratio.
7. **long context** — a Llama (hidden 2048, 6 layers, 1 × 16384 tokens on a GPU) with its MLPs run
   in 8 pieces of tokens (``chunk_sequence``) and a 2 GiB host budget (so the residual stream it re-runs blocks
   from is offloaded), planned 10 % above its smallest budget: the real peak against the plan, and
   its gradients against the same model with whole MLPs.

The exit status is 1 if any row fails.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import memopt  # noqa: E402
from memopt.memory.tracker import MemoryTracker  # noqa: E402

MIB = 2**20
TOLERANCE = 0.02  # a real peak may differ from the prediction by this fraction (allocator rounding, workspace)


@dataclass
class Row:
    check: str
    ok: bool | None  # None: skipped
    detail: str


_SMOKE_SOLVER_S = 1.0  # CP-SAT's time per phase in the CPU smoke (toy problems: the rows check code paths, not plans)
_solver_s = 5.0  # on a GPU: a dozen plans must fit the kit's 8 minutes


def _optimize(model: torch.nn.Module, budget: float, batch: dict, **options: object) -> memopt.OptimizedModel:
    """``memopt.optimize`` with the kit's solver time (a ``planner`` given keeps its own switches)."""
    planner = options.pop("planner", memopt.PlannerConfig())
    planner = dataclasses.replace(planner, time_limit_s=_solver_s)
    begun = time.perf_counter()
    optimized = memopt.optimize(model, budget, batch, planner=planner, **options)
    plan = optimized.plan
    print(f"    planned at {budget:.2f} GiB in {time.perf_counter() - begun:.0f} s: predicted peak "
          f"{plan.predicted_peak_bytes / MIB:,.1f} MiB", flush=True)
    return optimized


def _llama(hidden: int, layers: int, vocab: int, intermediate: int, heads: int, kv_heads: int, *,
           device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama with random weights, made where it will run and in its dtype (an 8B model initialized
    on the CPU in fp32 would take minutes of the kit's time)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                   max_position_embeddings=131072, use_cache=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)


def _batch(vocab: int, batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def _time(fn: Callable[[], object], cuda: bool, repeat: int = 5, warm_up: bool = True) -> float:
    """Median seconds of ``fn`` (after one warm-up call unless ``warm_up`` is false)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- 1. kernels

def check_kernels(cuda: bool, smoke: bool) -> list[Row]:
    from memopt.kernels.dequant import dequant_matmul_reference, dequant_matmul_triton
    from memopt.kernels.paca import Blocks, paca_forward_reference, paca_forward_triton, triton_available
    from memopt.passes.quant_format import quantize_int8, quantize_nf4

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not triton_available() or not (cuda or interpreted):
        return [Row("kernels", None, "skipped: needs CUDA, or TRITON_INTERPRET=1 for the interpreter")]
    device = "cuda" if cuda else "cpu"
    m, k, n, r = (37, 41, 24, 5) if smoke else (4096, 4096, 11008, 64)
    blocks = Blocks(m=16, n=16, k=16, group_m=2, num_warps=1, num_stages=1) if smoke else None
    dtypes = (torch.float32,) if smoke else (torch.float16, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in dtypes:
        # both sum in fp32 (in another order) and round once to dtype: two ulps of the output's scale
        # (the sum's own error, ~k^0.5 fp32 ulps, is far below one ulp of a 16-bit output)
        limit = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        w = torch.randn(n, k, generator=gen).to(device, dtype)
        idx = torch.randperm(k, generator=gen)[:r].to(device)
        got, gathered = paca_forward_triton(x, w, None, idx, "linear", blocks=blocks)
        ref, ref_gathered = paca_forward_reference(x, w, None, idx, "linear")
        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
        ok = err <= limit and torch.equal(gathered, ref_gathered)
        speed = ""
        if cuda:
            ratio = _time(functools.partial(paca_forward_triton, x, w, None, idx, "linear"), cuda) / \
                _time(functools.partial(paca_forward_reference, x, w, None, idx, "linear"), cuda)
            speed = f", time {ratio:.2f}x torch"
        rows.append(Row(f"kernel paca {str(dtype)[6:]}", ok, f"max error {err:.2e} of the scale (limit {limit:.1e})"
                                                               f"{speed}"))
        for fmt, quantize in (("nf4", quantize_nf4), ("int8", quantize_int8)):
            qw = quantize(torch.randn(n, k, generator=gen))
            data, scales = qw.data.to(device), qw.scales().to(device)
            args = (x, qw.fmt, data, scales, qw.shape, qw.block, None, True)
            got = dequant_matmul_triton(*args, blocks=blocks)
            ref = dequant_matmul_reference(*args)
            err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
            speed = ""
            if cuda:
                ratio = _time(functools.partial(dequant_matmul_triton, *args), cuda) / \
                    _time(functools.partial(dequant_matmul_reference, *args), cuda)
                speed = f", time {ratio:.2f}x torch (dequantize + matmul)"
            rows.append(Row(f"kernel dequant-matmul {fmt} {str(dtype)[6:]}", err <= limit,
                            f"max error {err:.2e} of the scale (limit {limit:.1e}){speed}"))
    return rows


# ----------------------------------------------------------------------------- 6. cut cross-entropy

def check_cut_ce(cuda: bool, smoke: bool) -> list[Row]:
    from memopt.kernels.cut_ce import (
        cut_ce_rows_grad_reference,
        cut_ce_rows_grad_triton,
        cut_ce_rows_reference,
        cut_ce_rows_triton,
        cut_cross_entropy,
        cut_cross_entropy_reference,
    )
    from memopt.kernels.paca import triton_available
    from memopt.memory import MemoryTracker

    device = "cuda" if cuda else "cpu"
    tokens, hidden, vocab = (64, 32, 1000) if smoke else (8192, 4096, 128256)
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    rows = []
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if triton_available() and (cuda or interpreted):
        logits = (torch.randn(min(tokens, 512), vocab, generator=gen) * 4).to(device, dtype)
        targets = torch.randint(0, vocab, (logits.shape[0],), generator=gen).to(device)
        lse, picked = cut_ce_rows_triton(logits, targets, -100)
        want_lse, want_picked = cut_ce_rows_reference(logits, targets, -100)
        scale = torch.full_like(lse, 1.0 / logits.shape[0])
        grad = cut_ce_rows_grad_triton(logits, targets, lse, scale, -100)
        want = cut_ce_rows_grad_reference(logits, targets, want_lse, scale, -100)
        err = max(float((lse - want_lse).abs().max()), float((picked - want_picked).abs().max()),
                  float((grad.float() - want.float()).abs().max() / want.float().abs().max()))
        limit = 1e-4 if dtype == torch.float32 else 1e-2
        rows.append(Row(f"kernel cut-CE rows {str(dtype)[6:]}", err <= limit, f"max error {err:.2e} (limit {limit:.0e})"))
    else:
        rows.append(Row("kernel cut-CE rows", None, "skipped: needs CUDA, or TRITON_INTERPRET=1 for the interpreter"))

    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)

    def run(fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        h.grad = w.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss = fn(h, w, targets)
            loss.backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            with MemoryTracker(parameters=[h, w], inputs=targets) as tracker:
                loss = fn(h, w, targets)
                loss.backward()
            peak = tracker.report().peak_bytes
        return loss.detach(), h.grad.clone(), w.grad.clone(), peak

    fused, unfused = run(cut_cross_entropy), run(cut_cross_entropy_reference)
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(fused[1:3], unfused[1:3]))
    loss_err = float((fused[0] - unfused[0]).abs() / unfused[0].abs())
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    speed = ""
    if cuda:
        def step(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
            return lambda: fn(h, w, targets).backward()
        speed = f", time {_time(step(cut_cross_entropy), cuda) / _time(step(cut_cross_entropy_reference), cuda):.2f}x"
    rows.append(Row(f"cut CE {tokens}x{vocab} {str(dtype)[6:]}", err <= limit and loss_err <= 1e-4 and fused[3] < unfused[3],
                    f"loss rel. error {loss_err:.1e}, gradients {err:.1e} (limit {limit:.0e}); peak "
                    f"{fused[3] / 2**20:,.1f} MiB fused vs {unfused[3] / 2**20:,.1f} MiB unfused{speed}"))
    return rows


# ----------------------------------------------------------------------------- 2-5. planned steps

def _real_peak(optimized: torch.nn.Module, batch: dict, cuda: bool, repeat: int = 3) -> tuple[int, float]:
    """(the peak of one steady-state step above what was allocated before it, its median time)."""
    opt = optimized.make_optimizer(lr=1e-4) if hasattr(optimized, "make_optimizer") else \
        torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # trace, then the steady state (optimizer state exists)
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:  # memopt's tracker counts every category, as the plan does
        with MemoryTracker(optimized, opt, inputs=batch) as tracker:
            step()
        peak = tracker.report().peak_bytes
    return peak, _time(step, cuda, repeat=repeat, warm_up=False)


def _compare(name: str, plan: memopt.Plan, measured: int, cuda: bool, extra: str = "") -> Row:
    """On CUDA the step's rise above what existed before it (``max_memory_allocated``) against the plan's
    peak less what is resident (parameters, buffers, inputs, optimizer state); on the CPU whole peaks."""
    predicted = plan.predicted_peak_bytes - (plan.static.resident if cuda else 0)
    off = (measured - predicted) / max(predicted, 1)
    what = "step rise" if cuda else "peak"
    return Row(name, measured <= predicted * (1 + TOLERANCE),
               f"{what} measured {measured / MIB:.2f} MiB, predicted {predicted / MIB:.2f} MiB ({100 * off:+.2f} %)"
               + extra)


def check_planned(cuda: bool, smoke: bool) -> list[Row]:
    device = "cuda" if cuda else "cpu"
    # 8 layers of a 1B Llama's width: planning a 16-layer one takes ~1.5 minutes per budget on the host
    shape = dict(hidden=64, layers=3, vocab=96, intermediate=128, heads=4, kv_heads=4) if smoke else \
        dict(hidden=2048, layers=8, vocab=32000, intermediate=5632, heads=16, kv_heads=16)
    dtype = torch.float32 if smoke else torch.bfloat16
    base = _llama(**shape, device=device, dtype=dtype)
    batch = _batch(shape["vocab"], 2 if smoke else 1, 64 if smoke else 2048, device)
    target = "cpu" if smoke else "cuda"
    lora = dict(method="lora", rank=16, device=target)
    keep = _optimize(copy.deepcopy(base), 512, batch, **lora)  # room for everything: the keep-all plan
    low, high = keep.plan.min_budget_bytes, keep.plan.predicted_peak_bytes + keep.plan.reserve_bytes
    hf = copy.deepcopy(base)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    _, hf_time = _real_peak(hf, batch, cuda)
    del hf
    rows, seconds = [], {}
    for label, fraction in (("smallest", 0.0), ("between", 0.4), ("keep all", 1.0)):
        budget = (low + fraction * (high - low)) / 2**30
        optimized = keep if fraction == 1.0 else _optimize(copy.deepcopy(base), budget, batch, **lora)
        measured, seconds[label] = _real_peak(optimized, batch, cuda)
        rows.append(_compare(f"planned step @ {label}", optimized.plan, measured, cuda,
                             f"; step {seconds[label]:.3f} s, HF checkpointing {hf_time:.3f} s "
                             f"({seconds[label] / hf_time:.2f}x)"))
    if cuda:
        rows.append(_guarded("offload step", functools.partial(_offload_row, base, batch, low, high, lora,
                                                               seconds["keep all"])))
    else:
        rows.append(Row("offload step", None, "skipped: needs CUDA (copies to host overlap only on a GPU)"))
    del base, keep
    rows.append(_guarded("compiled step @ between", functools.partial(_compiled_row, shape, dtype, cuda, smoke)))
    return rows


def _offload_row(base: torch.nn.Module, batch: dict, low: int, high: int, lora: dict, keep_seconds: float) -> Row:
    """Without recomputation, 80 % of the way from the smallest budget to keeping all: what does not
    fit is offloaded; the copies' cost shows as step time."""
    optimized = _optimize(copy.deepcopy(base), (low + 0.8 * (high - low)) / 2**30, batch,
                          planner=memopt.PlannerConfig(allow_recompute=False), **lora)
    measured, seconds = _real_peak(optimized, batch, True)
    plan = optimized.plan
    return _compare("offload step", plan, measured, True,
                    f"; {plan.bytes_by_action()['offload'] / MIB:.0f} MiB offloaded, step {seconds:.3f} s vs "
                    f"{keep_seconds:.3f} s keeping all (predicted exposed copies {plan.exposed_transfer_us / 1e6:.3f} s)")


def _compiled_row(shape: dict, dtype: torch.dtype, cuda: bool, smoke: bool) -> Row:
    """Inductor's step (Triton kernels on a GPU) between the smallest budget and keeping all; 4 layers
    on a GPU (Inductor compiles the whole step)."""
    shape = shape if smoke else {**shape, "layers": 4}
    base = _llama(**shape, device="cuda" if cuda else "cpu", dtype=dtype)
    batch = _batch(shape["vocab"], 2 if smoke else 1, 64 if smoke else 2048, "cuda" if cuda else "cpu")
    options = dict(method="lora", rank=16, device="cuda" if cuda else "cpu")
    probe = _optimize(copy.deepcopy(base), 512, batch, **options).plan
    budget = (probe.min_budget_bytes + 0.4 * (probe.predicted_peak_bytes + probe.reserve_bytes
                                              - probe.min_budget_bytes)) / 2**30
    compiled = _optimize(base, budget, batch, compile=True, **options)
    measured, seconds = _real_peak(compiled, batch, cuda)
    return _compare(f"compiled step @ between ({shape['layers']} layers)", compiled.plan, measured, cuda,
                    f"; step {seconds:.3f} s")


def _guarded(name: str, row: Callable[[], Row]) -> Row:
    """``row()``, or a failed row naming the exception (the check's other rows still run)."""
    try:
        return row()
    except Exception as error:
        traceback.print_exc()
        return Row(name, False, f"raised {type(error).__name__}: {str(error).splitlines()[0][:200]}")


def check_qlora(cuda: bool, smoke: bool) -> list[Row]:
    device = "cuda" if cuda else "cpu"
    # Llama-3.1-8B's shapes, 8 of its 32 layers: planning all 32 at 32k tokens takes ~7 minutes on the host
    shape = dict(hidden=64, layers=2, vocab=96, intermediate=128, heads=4, kv_heads=2) if smoke else \
        dict(hidden=4096, layers=8, vocab=128256, intermediate=14336, heads=32, kv_heads=8)
    seq = 128 if smoke else 32768
    base = _llama(**shape, device=device, dtype=torch.float32 if smoke else torch.bfloat16)
    batch = _batch(shape["vocab"], 1, seq, device)
    target = "cpu" if smoke else "cuda"
    budget = 1 if smoke else 80  # an 80 GB card
    optimized = _optimize(base, budget, batch, method="lora", rank=32, quantize="nf4", device=target,
                          cut_cross_entropy=True)
    measured, seconds = _real_peak(optimized, batch, cuda, repeat=1)
    return [_compare(f"QLoRA nf4 r32 cut-CE 1x{seq} @ {budget} GiB", optimized.plan, measured, cuda,
                     f"; step {seconds:.3f} s")]


def check_long_context(cuda: bool, smoke: bool) -> list[Row]:
    """Sequence chunking with the residual stream offloaded: the planned step's real peak against the
    plan, and its gradients against the same model with whole MLPs."""
    from memopt.passes import seq_chunk

    device = "cuda" if cuda else "cpu"
    shape = dict(hidden=64, layers=2, vocab=96, intermediate=256, heads=4, kv_heads=4) if smoke else \
        dict(hidden=2048, layers=6, vocab=32000, intermediate=5632, heads=16, kv_heads=16)
    base = _llama(**shape, device=device, dtype=torch.float32 if smoke else torch.bfloat16)
    batch = _batch(shape["vocab"], 1, 128 if smoke else 16384, device)
    options = dict(method="lora", rank=16, device="cpu" if smoke else "cuda", chunk_sequence=4 if smoke else 8,
                   host_budget_gb=None if smoke else 2)
    probe = _optimize(copy.deepcopy(base), 512, batch, **options).plan
    budget = (probe.min_budget_bytes + 0.1 * (probe.predicted_peak_bytes + probe.reserve_bytes
                                              - probe.min_budget_bytes)) / 2**30
    optimized = _optimize(copy.deepcopy(base), budget, batch, **options)
    measured, seconds = _real_peak(optimized, batch, cuda)
    plan = optimized.plan
    sources = sum(t.nbytes for t in plan.tensors if t.action == "offload" and t.reason.startswith("saved on the host"))
    rows = [_compare(f"chunked MLPs ({options['chunk_sequence']} pieces) 1x{batch['input_ids'].shape[1]}", plan,
                     measured, cuda, f"; {sources / MIB:.0f} MiB of residual stream offloaded; step {seconds:.3f} s")]
    whole = copy.deepcopy(optimized.model)
    seq_chunk.uninstall(whole)
    for m in (optimized, whole):
        for p in m.parameters():
            p.grad = None
        m(**batch).loss.backward()
    named = dict(whole.named_parameters())
    worst = max(((p.grad - named[n].grad).abs().max() / named[n].grad.abs().max().clamp_min(1e-30)).item()
                for n, p in optimized.model.named_parameters() if p.grad is not None)
    tolerance = 1e-5 if smoke else 2e-2  # bf16 GEMMs on pieces against whole ones
    rows.append(Row("chunked gradients vs whole", worst <= tolerance,
                    f"largest relative difference {worst:.2e} (tolerance {tolerance:g})"))
    return rows


CHECKS = (check_kernels, check_cut_ce, check_planned, check_qlora, check_long_context)


def _status(row: Row) -> str:
    return "skip" if row.ok is None else "ok" if row.ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (what CI runs)")
    parser.add_argument("--only", nargs="+", metavar="CHECK", choices=[c.__name__.removeprefix("check_") for c in CHECKS],
                        help="run these checks alone (kernels, cut_ce, planned, long_context, qlora)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke")
    global _solver_s
    _solver_s = _SMOKE_SOLVER_S if args.cpu_smoke else _solver_s
    start = time.perf_counter()
    rows, seconds = [], []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        if args.only and name not in args.only:
            continue
        begun = time.perf_counter()
        try:
            found = check(cuda, args.cpu_smoke)
        except Exception as error:  # one broken check must not hide the others' rows
            traceback.print_exc()
            found = [Row(name, False, f"raised {type(error).__name__}: {str(error).splitlines()[0][:200]}")]
        for r in found:  # as each check ends: a kit stopped at its time limit still shows what it measured
            print(f"[{time.perf_counter() - start:.0f} s] {r.check}: {_status(r)}  {r.detail}", flush=True)
        rows += found
        seconds.append(f"{name} {time.perf_counter() - begun:.0f} s")
        if cuda:
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if cuda else "CPU (smoke run: toy sizes)"
    print(f"memopt GPU check kit on {device}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s "
          f"({', '.join(seconds)})")
    width = max(len(r.check) for r in rows)
    for r in rows:
        print(f"{r.check:<{width}}  {_status(r):<4}  {r.detail}")
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
