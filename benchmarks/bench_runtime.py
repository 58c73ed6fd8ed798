"""memopt's lowered plans beside their peers on CPU: measured peak and step time at three budgets.

One small Llama (random weights, ``attn_implementation="sdpa"``, fp32) is fine-tuned with LoRA
(rank 16, every Linear but the LM head) and AdamW on one batch of random token ids. Every
configuration has the same LoRA parameterization, so only the handling of activations differs:

* memopt eager     ``memopt.optimize(model, budget_gb=B, device="cpu", compile=False)``: the plan's
                   keep / recompute decisions, the traced step run op by op.
* memopt compiled  the same plan, ``compile=True``: the partitioned step through Inductor.
* HF GC            the LoRA model (``memopt.optimize`` with a budget so large that everything is
                   kept, i.e. plain eager; its ``.model``) with HF's
                   ``gradient_checkpointing_enable(use_reentrant=False)``: every decoder layer is
                   recomputed. One peak whatever the budget; shown in every budget's rows.
* compile+amb(x)   ``torch.compile`` of that LoRA model under
                   ``torch._functorch.config.patch(activation_memory_budget=x)`` (active for the
                   whole worker, so for the compile at the first call). Each x in ``--amb`` is run
                   once; for each budget the row is the fastest x whose peak <= memopt's (the
                   larger of memopt eager's and compiled's peak at that budget, so the peer gets
                   at least the memory memopt uses), or the lowest-peak x when none is (flagged).

The budgets are 0.15, 0.5 and 0.85 of the way from the smallest feasible budget
(``plan.min_budget_bytes``) to the keep-everything peak (``plan.memory.peak_bytes``), from one
planning probe in this process.

How it is measured. Memory inside Inductor-compiled code is invisible to torch's dispatch-mode
trackers, so every configuration is measured the same way (DESIGN.md section 8): each runs in its
own subprocess started with ``MALLOC_MMAP_THRESHOLD_=65536``, so every large tensor is its own
mmap, returned to the OS when freed. After 2 warm-up steps (the compile included; step 1 also
creates AdamW's state) each of ``--peak-steps`` steps (forward + backward + AdamW step +
zero_grad) runs with the high-water mark reset before it (``5`` written to /proc/self/clear_refs)
and VmHWM read after it: the step's *peak rise* is VmHWM_after - VmRSS_before, the bytes newly
allocated and live at once at the step's peak. The table shows the largest rise over those steps
(their spread is printed at the end).

Step time is measured in the same process afterwards, but not in that allocator mode: with every
large tensor a fresh mmap, each one's pages fault in on first touch, which made a plain eager step
~75% slower in CPU time here (0.99 s vs 0.565 s) and would charge configurations by the bytes they
allocate rather than by their compute. So the worker then sets glibc back to heap reuse with
``mallopt`` (mmap threshold 32 MiB, trim threshold 64 MiB: where glibc's dynamic default
settles), runs one untimed step, and times ``--steps`` steps: the median ``time.perf_counter``
wall time is reported, with the median CPU time of the process (all its threads) beside it, which
other processes' load on a shared machine disturbs less.

The rise counts only what the step allocates: activations, gradients of the LoRA weights,
temporaries, AdamW's temporaries. Parameters, AdamW's state and the batch exist before the step
and are not in it, so compare rises between methods. memopt's *predicted* peak
(``plan.predicted_peak_bytes``) counts every tensor; it is printed for context with the planned
saved bytes (keep / recompute) and a *predicted rise*: the predicted peak less what is resident
before the step (``plan.static.resident``: parameters, buffers, the batch, AdamW's state).

Target (the issue): memopt's step time <= each peer's at an equal or lower peak. Per budget and
peer, the verdict takes the faster (wall) of memopt eager / compiled among those whose rise is <=
the peer's (+ ``--tol``: max(1 MiB, 1%) by default, the measurement's noise), and says whether its
median wall step time is <= the peer's; the CPU-time ratio is printed beside it, and a verdict the
CPU time would reverse is flagged. When both memopt variants peak above a peer there is no
equal-or-lower-peak comparison at that budget and the line says so (n/a).

    python benchmarks/bench_runtime.py                   # hidden 384, 4 layers, batch 4 x 256, vocab 2048
    python benchmarks/bench_runtime.py --quick           # one budget (0.5), amb x in 1.0 / 0.5 / 0.1
    python benchmarks/bench_runtime.py --fractions 0.01  # memopt at (nearly) its smallest budget

Measured here (2 CPU cores, load from other jobs; 1 thread per worker; torch 2.13.0+cpu;
``python benchmarks/bench_runtime.py``, 502 s). Rise MiB / median step s (predicted rise beside):

    budget (MiB)    predicted  memopt eager   memopt compiled   HF GC         compile+amb(x)
    0.15 (96.2)     57.8       55.7 / 0.931   55.5 / 0.851      41.9 / 1.033  amb 0.7: 95.7 / 0.714
    0.50 (130.9)    92.4       90.8 / 0.653   90.6 / 0.576      41.9 / 1.033  amb 0.7: 95.7 / 0.714
    0.85 (165.5)    127.1      125.1 / 0.681  121.1 / 0.619     41.9 / 1.033  amb 1.0: 121.8 / 0.556

Both memopt lowerings stay under the predicted rise at every budget (compiled: with the backward's
Inductor settings of ``memopt/runtime/compiled.py``; Inductor's defaults rose 85.6 MiB at 0.15).
Across budgets, memopt compiled @0.5 (90.6 MiB, 0.576 s) meets the target against compile+amb 0.7,
0.5, 0.3 and 0.1 (x0.78-0.91 of their time at a lower peak) and misses amb 1.0 (x1.035, at 90.6 vs
121.8 MiB); n/a against HF GC (every layer recomputed, 41.9 MiB, below memopt's smallest plan
here). Every configuration's first-step loss is the same (7.70633).

At memopt's smallest budget (``python benchmarks/bench_runtime.py --fractions 0.0,0.05 --amb 0.1``,
283 s; the planner may now re-run a whole block at its backward's start, so the smallest feasible
budget fell from 81.2 to 76.4 MiB):

    budget (MiB)    predicted  memopt eager   memopt compiled   HF GC         compile+amb(0.1)
    0.00 (76.4)     38.0       37.4 / 0.474   43.9 / 0.412      40.4 / 0.508  100.5 / 0.405
    0.05 (81.4)     43.0       41.8 / 0.476   40.4 / 0.378      40.4 / 0.508  100.5 / 0.405

memopt's smallest plan peaks below HF gradient checkpointing (37.4 vs 40.4 MiB) at x0.93 its step
time; at HF's peak memopt compiled takes x0.74 of its time. At the very minimum the compiled
backward rises above the prediction (43.9 vs 38.0 MiB: Inductor holds more of a block re-run
whole); the eager lowering does not.

Worker subprocesses run ``python benchmarks/bench_runtime.py --worker '<json>'`` and print one
JSON line; ``--threads`` (default 1, as in bench_adapters.py: on a shared 2-core machine
multi-threaded times swing with other processes' load) is set in every worker.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

_MIB = 2**20
_GIB = 2**30
_MARK = "BENCH_RUNTIME_RESULT "
_FRACTIONS = (0.15, 0.5, 0.85)
_AMB = (1.0, 0.7, 0.5, 0.3, 0.1)
_AMB_QUICK = (1.0, 0.5, 0.1)
_HUGE_GB = 1024.0  # a budget at which memopt keeps everything and runs the model as it is


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    rank: int


# --------------------------------------------------------------------------- the worker (subprocess)


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value, unit = line.split()
                assert unit == "kB"
                out[key[:-1]] = int(value) * 1024
    return out


def _reset_hwm() -> int:
    """Reset the high-water mark to the current RSS and return that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status()["VmRSS"]


def _heap_mode() -> bool:
    """Let glibc serve large allocations from its heap again, as its dynamic default settles to
    (mmap threshold 32 MiB, trim threshold 64 MiB): MALLOC_MMAP_THRESHOLD_ fixes both low, and
    then every large tensor is a fresh mmap whose pages fault in on first touch, which made an
    eager step ~75% slower in CPU time here. True if both settings took."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * _MIB)) and bool(libc.mallopt(m_trim_threshold, 64 * _MIB))


def _llama(shape: Shape):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, vocab_size=shape.vocab,
        max_position_embeddings=max(2048, shape.seq), use_cache=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)  # every configuration starts from the same weights (and LoRA init)
    return transformers.LlamaForCausalLM(cfg)


def _batch(shape: Shape) -> dict:
    import torch

    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def _optimize(shape: Shape, batch: dict, budget_gb: float, compile: bool):
    import memopt

    return memopt.optimize(_llama(shape), budget_gb=budget_gb, example_inputs=batch, method="lora",
                           device="cpu", rank=shape.rank, alpha=2 * shape.rank, compile=compile)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import contextlib

    import torch

    torch.set_num_threads(spec["threads"])
    shape = Shape(**spec["shape"])
    batch = _batch(shape)
    kind = spec["kind"]
    out: dict[str, Any] = {"kind": kind, "threads": torch.get_num_threads(),
                           "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    scope = contextlib.nullcontext()
    start = time.perf_counter()
    if kind in ("memopt-eager", "memopt-compiled"):
        model = _optimize(shape, batch, spec["budget_gb"], compile=kind == "memopt-compiled")
        plan = model.plan
        out.update(predicted_peak_bytes=plan.predicted_peak_bytes, bytes_by_action=plan.bytes_by_action(),
                   needs_runtime=plan.needs_runtime, lowering=model.applied.lowering,
                   budget_bytes=plan.budget_bytes, resident_bytes=plan.static.resident if plan.static else None)
        params = model.parameters()
        step_model = model
    else:
        inner = _optimize(shape, batch, _HUGE_GB, compile=False).model  # the LoRA model, plain eager
        params = inner.parameters()
        if kind == "hf-gc":
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            step_model = inner
        elif kind == "compile-amb":
            scope = torch._functorch.config.patch(activation_memory_budget=spec["amb"])
            step_model = torch.compile(inner)
        else:
            raise ValueError(kind)
    out["setup_s"] = time.perf_counter() - start
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = step_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    with scope:
        warm = []
        for _ in range(2):  # step 1 compiles (compiled configurations) and creates AdamW's state
            t0 = time.perf_counter()
            loss = step()
            warm.append(time.perf_counter() - t0)
            out.setdefault("loss1", loss)
        out["warmup_s"] = warm
        rises, mmap_walls = [], []
        for _ in range(spec["peak_steps"]):  # the peak, every large tensor its own mmap
            gc.collect()
            before = _reset_hwm()
            wall = time.perf_counter()
            step()
            mmap_walls.append(time.perf_counter() - wall)
            rises.append(_proc_status()["VmHWM"] - before)
        # Timing: back to a heap that is reused (no page faults on every fresh tensor), one step to grow it.
        out["heap_mode"] = _heap_mode()
        step()
        walls, cpus = [], []
        for _ in range(spec["steps"]):
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    out.update(rises=rises, mmap_walls=mmap_walls, walls=walls, cpus=cpus)
    return out


# --------------------------------------------------------------------------- the parent


@dataclass
class Result:
    name: str
    kind: str
    rise: int  # bytes, the largest over the --peak-steps steps
    wall: float  # median s
    cpu: float  # median s
    raw: dict[str, Any]

    @property
    def spread(self) -> int:
        return max(self.raw["rises"]) - min(self.raw["rises"])


def run_worker(spec: dict[str, Any], name: str, timeout: float) -> Result | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {name}: timed out after {timeout:.0f} s", flush=True)
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        print(f"  {name}: FAILED (exit {proc.returncode}); stderr tail:\n" + "\n".join(
            "    " + ln for ln in proc.stderr.splitlines()[-40:]), flush=True)
        return None
    raw = json.loads(lines[-1][len(_MARK):])
    res = Result(name, spec["kind"], max(raw["rises"]), statistics.median(raw["walls"]),
                 statistics.median(raw["cpus"]), raw)
    print(f"  {name}: rise {res.rise / _MIB:.1f} MiB, step {res.wall:.3f} s, first step {raw['warmup_s'][0]:.1f} s, "
          f"setup {raw['setup_s']:.1f} s, worker {time.perf_counter() - t0:.0f} s", flush=True)
    return res


def probe(shape: Shape) -> tuple[int, int, int, float]:
    """(smallest feasible budget, keep-everything peak, resident bytes, planner seconds) from one plan."""
    import torch

    torch.set_num_threads(1)
    batch = _batch(shape)
    t0 = time.perf_counter()
    plan = _optimize(shape, batch, _HUGE_GB, compile=False).plan
    if plan.min_budget_bytes is None or plan.memory is None:
        raise RuntimeError("the plan has no solver report / memory report: cannot place the budgets")
    resident = plan.static.resident if plan.static else 0
    return plan.min_budget_bytes - plan.reserve_bytes, plan.memory.peak_bytes, resident, time.perf_counter() - t0


def _r(a: float, b: float) -> str:
    return f"{a / b:8.3f}" if b else f"{'-':>8}"


def table(rows: list[Result], base: Result | None) -> str:
    lines = [f"    {'configuration':<22} {'rise MiB':>9} {'step s':>7} {'cpu s':>7} {'peak/eag':>8} {'time/eag':>8}"]
    for r in rows:
        lines.append(f"    {r.name:<22} {r.rise / _MIB:9.1f} {r.wall:7.3f} {r.cpu:7.3f} "
                     f"{_r(r.rise, base.rise) if base else '-':>8} {_r(r.wall, base.wall) if base else '-':>8}")
    return "\n".join(lines)


def _within(a: int, b: int, tol: float) -> bool:
    """a <= b, allowing the measurement's noise: max(1 MiB, tol * b)."""
    return a <= b + max(_MIB, tol * b)


def verdict(memopts: list[Result], peer: Result, tol: float) -> str:
    ok = [m for m in memopts if _within(m.rise, peer.rise, tol)]
    if not ok:
        best = min(memopts, key=lambda m: m.rise)
        return (f"vs {peer.name:<17}: n/a    memopt peaks higher ({best.rise / _MIB:.1f} > "
                f"{peer.rise / _MIB:.1f} MiB): no equal-or-lower-peak comparison at this budget")
    m = min(ok, key=lambda m: m.wall)
    met = m.wall <= peer.wall
    flag = "  (CPU time says otherwise)" if met != (m.cpu <= peer.cpu) else ""
    return (f"vs {peer.name:<17}: {'MET   ' if met else 'MISSED'} {m.name} {m.wall:.3f} s at {m.rise / _MIB:.1f} MiB "
            f"vs {peer.wall:.3f} s at {peer.rise / _MIB:.1f} MiB: wall x{m.wall / peer.wall:.3f}, "
            f"cpu x{m.cpu / peer.cpu:.3f}{flag}")


def pick_amb(ambs: list[Result], limit: int, tol: float) -> tuple[Result | None, bool]:
    """The fastest compile+amb run whose rise <= limit, else the lowest-rise one (flag False)."""
    if not ambs:
        return None, False
    fit = [a for a in ambs if _within(a.rise, limit, tol)]
    if fit:
        return min(fit, key=lambda a: a.wall), True
    return min(ambs, key=lambda a: a.rise), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    parser.add_argument("--peak-steps", type=int, default=2, help="steps measured for the peak (largest rise reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every worker (default 1)")
    parser.add_argument("--amb", type=str, default=None,
                        help="comma-separated activation_memory_budget values (default 1.0,0.7,0.5,0.3,0.1)")
    parser.add_argument("--fractions", type=str, default=None,
                        help="comma-separated budget positions between the smallest feasible (0) and keep-all (1) "
                        "budgets (default 0.15,0.5,0.85; --quick: 0.5)")
    parser.add_argument("--tol", type=float, default=0.01, help="peak tolerance for 'equal' (fraction; >= 1 MiB)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker")
    parser.add_argument("--quick", action="store_true", help="one budget (0.5) and amb x in 1.0, 0.5, 0.1")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        result = _worker(json.loads(args.worker))
        print(_MARK + json.dumps(result), flush=True)
        return

    import torch

    started = time.perf_counter()
    heads = max(1, args.hidden // 64)
    intermediate = (int(args.hidden * 8 / 3) + 63) // 64 * 64
    shape = Shape(hidden=args.hidden, layers=args.layers, heads=heads, intermediate=intermediate, vocab=args.vocab,
                  batch=args.batch, seq=args.seq, rank=args.rank)
    fractions = (0.5,) if args.quick else _FRACTIONS
    if args.fractions:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    ambs = [float(x) for x in args.amb.split(",")] if args.amb else list(_AMB_QUICK if args.quick else _AMB)
    print(f"Llama {shape}, LoRA (alpha {2 * args.rank}), fp32, CPU ({args.threads} thread(s) per worker), AdamW, "
          f"torch {torch.__version__}; {args.steps} timed steps per configuration; load average "
          f"{os.getloadavg()[0]:.2f}")

    min_budget, keep_all, resident, plan_s = probe(shape)
    budgets = [min_budget + f * (keep_all - min_budget) for f in fractions]
    print(f"planning probe ({plan_s:.1f} s): smallest feasible budget {min_budget / _MIB:.1f} MiB, keep-everything "
          f"peak {keep_all / _MIB:.1f} MiB (CPU: no reserve); resident before a step (parameters, buffers, batch, "
          f"AdamW state) {resident / _MIB:.1f} MiB, so predicted rises {(min_budget - resident) / _MIB:.1f} to "
          f"{(keep_all - resident) / _MIB:.1f} MiB; budgets " + ", ".join(
              f"{f:.2f} -> {b / _MIB:.1f} MiB" for f, b in zip(fractions, budgets)), flush=True)

    base_spec = {"shape": asdict(shape), "threads": args.threads, "steps": args.steps, "peak_steps": args.peak_steps}
    memopt_runs: dict[int, list[Result]] = {}
    for i, b in enumerate(budgets):
        memopt_runs[i] = []
        for kind, label in (("memopt-eager", "memopt eager"), ("memopt-compiled", "memopt compiled")):
            res = run_worker(dict(base_spec, kind=kind, budget_gb=b / _GIB), f"{label} @{fractions[i]:.2f}",
                             args.timeout)
            if res is not None:
                memopt_runs[i].append(res)
    hf_gc = run_worker(dict(base_spec, kind="hf-gc"), "HF GC", args.timeout)
    amb_runs = [r for x in ambs
                if (r := run_worker(dict(base_spec, kind="compile-amb", amb=x), f"compile+amb({x:g})", args.timeout))]

    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    print("\nall torch.compile + activation_memory_budget runs (the peer's tuning curve):")
    print(table(amb_runs, None))

    for i, b in enumerate(budgets):
        runs = memopt_runs[i]
        print(f"\nbudget {fractions[i]:.2f} of the way: {b / _MIB:.1f} MiB")
        eager = next((r for r in runs if r.kind == "memopt-eager"), None)
        for r in runs:
            acts = r.raw["bytes_by_action"]
            predicted, res = r.raw["predicted_peak_bytes"], r.raw["resident_bytes"] or 0
            print(f"    {r.name}: predicted peak {predicted / _MIB:.1f} MiB (all tensors), predicted rise "
                  f"{(predicted - res) / _MIB:.1f}, measured rise {r.rise / _MIB:.1f}; saved tensors kept "
                  f"{acts['keep'] / _MIB:.1f} MiB, recomputed {acts['recompute'] / _MIB:.1f}, extra recompute sources "
                  f"saved {acts['save'] / _MIB:.1f}")
        rows = list(runs)
        peers: list[Result] = []
        if hf_gc:
            rows.append(hf_gc)
            peers.append(hf_gc)
        note = ""
        if runs:
            limit = max(r.rise for r in runs)
            amb, fits = pick_amb(amb_runs, limit, args.tol)
            if amb is not None:
                rows.append(amb)
                peers.append(amb)
                if not fits:
                    note = (f"    note: no activation_memory_budget tried peaks at or below memopt's "
                            f"{limit / _MIB:.1f} MiB; shown: the lowest-peak one, {amb.name}")
        print(table(rows, eager))
        if note:
            print(note)
        if runs:
            for peer in peers:
                print("    target " + verdict(runs, peer, args.tol))
    every_memopt = [r for v in memopt_runs.values() for r in v]
    if every_memopt:
        print("\nacross all budgets: for each peer run, the fastest memopt run (any budget, eager or compiled) at an "
              "equal or lower peak:")
        for peer in [*([hf_gc] if hf_gc else []), *amb_runs]:
            print("    target " + verdict(every_memopt, peer, args.tol).replace("at this budget", "at any budget"))
    print("\npeak rise spread over the --peak-steps steps (max - min), MiB: " + ", ".join(
        f"{r.name} {r.spread / _MIB:.2f}" for r in [*(r for v in memopt_runs.values() for r in v),
                                                   *([hf_gc] if hf_gc else []), *amb_runs]))
    print("first-step loss (same weights, LoRA init and batch everywhere): " + ", ".join(
        f"{r.name} {r.raw['loss1']:.5f}" for r in [*(r for v in memopt_runs.values() for r in v),
                                                 *([hf_gc] if hf_gc else []), *amb_runs]))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
