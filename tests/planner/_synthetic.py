"""Random joint traces of chain-like networks, for planner tests that need exact optima.

A forward of ``n`` ops, each reading its predecessor (and sometimes the one before it) and one
parameter, allocating one activation of a random size; a random subset is saved for backward.
The backward walks back, reading each saved activation and the running gradient. Sizes are whole
512-byte blocks and FLOPs give roofline times of a few to tens of µs on an RTX 4090, while the
copies of the larger activations take tens of µs: recompute, offload and keep all compete.
"""

from __future__ import annotations

import random

from memopt.ir.joint import JointTrace, Storage, TracedOp

_BLOCK = 512
_BF16_FLOPS_PER_US = 165_200_000  # an RTX 4090 does this many bf16 FLOPs per µs


def chain_trace(n: int, seed: int, *, saved_share: float = 0.7, rng_op: int | None = None,
                blocks: int = 0) -> JointTrace:
    """``blocks`` > 0 repeats one random block of ``n`` ops that many times (identical blocks)."""
    rnd = random.Random(seed)
    pattern = [(rnd.randint(64, 2048) * _BLOCK, rnd.randint(2, 40) * _BF16_FLOPS_PER_US, rnd.random() < saved_share,
                rnd.random() < 0.3) for _ in range(n)]
    layers = pattern * max(blocks, 1)
    storages = [Storage(0, 4096, "parameter", None, ("weight",), (1024, 2), "bfloat16"),
                Storage(1, 8192, "input", None, ("x",), (4096,), "bfloat16")]
    ops: list[TracedOp] = []
    values: list[int] = []
    for i, (nbytes, flops, _, skip) in enumerate(layers):
        sid = len(storages)
        reads = (0, values[-1] if values else 1) + ((values[-2],) if skip and len(values) > 1 else ())
        storages.append(Storage(sid, nbytes, "activation", len(ops), (f"f{i}",), (nbytes // 2,), "bfloat16"))
        tags = frozenset({"rng"}) if i == rng_op else frozenset()
        ops.append(TracedOp(f"f{i}", "aten.mm.default", "forward", f"layers.{i // n}.op{i % n}" if blocks else None,
                            i // n if blocks else None, reads, (sid,), flops, 0, "bfloat16", tags))
        values.append(sid)
    saved = tuple(v for v, (_, _, keep, _) in zip(values, layers) if keep)
    num_forward = len(ops)
    grad = None
    for i in reversed(range(len(layers))):
        sid = len(storages)
        reads = ((values[i],) if values[i] in saved else ()) + ((grad,) if grad is not None else (0,))
        kind = "gradient" if i == 0 else "temporary"
        storages.append(Storage(sid, layers[i][0], kind, len(ops), (f"g{i}",), (layers[i][0] // 2,), "bfloat16"))
        ops.append(TracedOp(f"b{i}", "aten.mm.default", "backward", f"layers.{i // n}.op{i % n}" if blocks else None,
                            i // n if blocks else None, reads, (sid,), 2 * layers[i][1], 0, "bfloat16"))
        grad = sid
    return JointTrace(tuple(ops), tuple(storages), num_forward, saved, _BLOCK, "adamw", 2048, 1024,
                      "layers" if blocks else None)
