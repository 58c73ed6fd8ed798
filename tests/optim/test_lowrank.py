"""memopt's optimizers against references written here from the formulas (float64 where they allow),
against torch AdamW where they must equal it, and across a save / weights_only load / resume."""

import io
import math
import zlib

import pytest
import torch

from memopt.optim import blockwise8
from memopt.optim.lowrank import AdamW8bit, Apollo, ApolloMini, GaLoreAdamW, GaLoreAdamW8bit

ALL = (AdamW8bit, GaLoreAdamW, GaLoreAdamW8bit, Apollo, ApolloMini)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(24, 10, generator=g).requires_grad_(),   # tall: m >= n
            torch.randn(8, 30, generator=g).requires_grad_(),    # wide
            torch.randn(30, generator=g).requires_grad_()]       # a vector: AdamW


def _grads(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(make, steps, params, start=0):
    opt = make(params)
    for t in range(start, start + steps):
        for p, grad in zip(params, _grads(t, params)):
            p.grad = grad
        opt.step()
    return opt


def test_a_vector_gets_torch_adamws_update_exactly():
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for cls in ALL:
        mine, ref = _params(), _params()
        _run(lambda ps, cls=cls: cls(ps, **kw), 5, mine)
        _run(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), 5, ref)
        assert torch.equal(mine[2], ref[2]), cls.__name__


def _adam(m, v, r, t, b1, b2, eps):
    m = b1 * m + (1 - b1) * r
    v = b2 * v + (1 - b2) * r * r
    return m, v, (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)


def _galore_reference(w, grads, lr, b1, b2, eps, wd, rank, gap, scale):
    """GaLore from its formulas, in float64 (the SVD of fp32 G, as specified, fixes the signs)."""
    w = w.double()
    m = v = proj = None
    tall = w.shape[0] >= w.shape[1]
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
            proj = (vh[:rank] if tall else u[:, :rank]).double()
        g = g.double()
        r = g @ proj.T if tall else proj.T @ g
        m = torch.zeros_like(r) if m is None else m
        v = torch.zeros_like(r) if v is None else v
        m, v, n = _adam(m, v, r, t, b1, b2, eps)
        w = w * (1 - lr * wd)
        w = w - lr * scale * (n @ proj if tall else proj @ n)
    return w


@pytest.mark.parametrize("which", [0, 1])
def test_galore_follows_its_formulas_across_projection_refreshes(which):
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, rank=3, update_proj_gap=2, scale=0.25)
    params = _params()
    start = params[which].detach().clone()
    _run(lambda ps: GaLoreAdamW(ps, **kw), 6, params)
    grads = [_grads(t, params)[which] for t in range(6)]
    ref = _galore_reference(start, grads, kw["lr"], *kw["betas"], kw["eps"], kw["weight_decay"], kw["rank"],
                            kw["update_proj_gap"], kw["scale"])
    torch.testing.assert_close(params[which].double(), ref, rtol=1e-5, atol=1e-6)


def _apollo_reference(w, grads, index, lr, b1, b2, eps, wd, rank, gap, scale, limit, seed, tensor_wise):
    """APOLLO from its description: P ~ N(0, 1/r) redrawn every ``gap`` steps from the documented seed."""
    w = w.double()
    wide = w.shape[0] <= w.shape[1]
    m = v = prev = None
    base = zlib.crc32(f"{seed}:{index}".encode())
    for t, g in enumerate(grads, start=1):
        gen = torch.Generator().manual_seed((base * 1_000_003 + (t - 1) // gap) % (2 ** 63))
        p = (torch.randn(rank, min(w.shape), generator=gen) / math.sqrt(rank)).double()
        g = g.double()
        r = p @ g if wide else g @ p.T
        m = torch.zeros_like(r) if m is None else m
        v = torch.zeros_like(r) if v is None else v
        m, v, n = _adam(m, v, r, t, b1, b2, eps)
        if tensor_wise:
            s = n.norm() / r.norm()
        else:
            dim = 0 if wide else 1
            s = n.norm(dim=dim, keepdim=True) / r.norm(dim=dim, keepdim=True)
        u = g * s
        if prev is not None and u.norm() > limit * prev:
            u = u * (limit * prev / u.norm())
        prev = u.norm()
        w = w * (1 - lr * wd)
        w = w - lr * scale * u
    return w


@pytest.mark.parametrize("cls", [Apollo, ApolloMini])
@pytest.mark.parametrize("which", [0, 1])
def test_apollo_follows_its_description(cls, which):
    rank = 1 if cls is ApolloMini else 2
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, rank=rank, update_proj_gap=2, scale=2.0,
              norm_growth_limit=1.01, seed=3)
    params = _params()
    start = params[which].detach().clone()
    _run(lambda ps: cls(ps, **kw), 6, params)
    grads = [_grads(t, params)[which] for t in range(6)]
    ref = _apollo_reference(start, grads, which, kw["lr"], *kw["betas"], kw["eps"], kw["weight_decay"], rank,
                            kw["update_proj_gap"], kw["scale"], kw["norm_growth_limit"], kw["seed"],
                            tensor_wise=cls is ApolloMini)
    torch.testing.assert_close(params[which].double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", ALL)
def test_a_resumed_run_makes_the_same_updates(cls):
    kw = dict(rank=2, update_proj_gap=3) if cls is not AdamW8bit else {}
    straight = _params()
    _run(lambda ps: cls(ps, lr=0.01, **kw), 8, straight)
    resumed = _params()
    first = _run(lambda ps: cls(ps, lr=0.01, **kw), 4, resumed)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # tensors and numbers only
    _run(lambda ps: _loaded(cls(ps, lr=0.01, **kw), state), 4, resumed, start=4)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b), cls.__name__


def _loaded(opt, state):
    opt.load_state_dict(state)
    return opt


def test_eight_bit_states_take_two_bytes_per_parameter_and_track_adamw():
    w = torch.randn(128, 128)
    ref, mine = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt_ref, opt_mine = torch.optim.AdamW([ref], lr=1e-2), AdamW8bit([mine], lr=1e-2)
    for t in range(20):
        g = torch.randn(128, 128, generator=torch.Generator().manual_seed(t))
        ref.grad, mine.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_mine.step()
    state = opt_mine.state[mine]
    stored = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    assert stored == 2 * blockwise8.stored_bytes(128 * 128) == 2 * (128 * 128 + 4 * 64)
    moved = (ref - w).norm()
    assert (mine - ref).norm() < 0.05 * moved  # 8-bit moments: the same trajectory within 5 % of the distance moved


def test_a_rank_not_below_a_side_falls_back_to_adamw_and_says_so():
    p = torch.randn(4, 16, requires_grad=True)
    opt = GaLoreAdamW([p, torch.randn(3, requires_grad=True)], rank=4)
    assert opt.fallback == {0: "rank 4 is not below its smaller side 4", 1: "1-D, not a matrix"}


def test_bad_options_are_refused():
    p = [torch.randn(4, 4, requires_grad=True)]
    with pytest.raises(ValueError, match="rank"):
        GaLoreAdamW(p, rank=0)
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="norm_growth_limit"):
        Apollo(p, norm_growth_limit=1.0)


def test_the_8bit_code_tables_are_bitsandbytes_dynamic_maps():
    bnb = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        assert torch.equal(blockwise8.dynamic_map(signed), bnb.create_dynamic_map(signed=signed))
    x = torch.randn(1000)
    q, absmax = blockwise8.quantize(x, True)
    back = blockwise8.dequantize(q, absmax, True, x.shape)
    assert (back - x).abs().max() <= 0.05 * x.abs().max()


@pytest.mark.parametrize("cls", [AdamW8bit, GaLoreAdamW8bit, Apollo])
def test_a_loaded_state_keeps_its_dtypes_on_bf16_parameters(cls):
    kw = {} if cls is AdamW8bit else {"rank": 2}
    p = torch.randn(128, 64, dtype=torch.bfloat16, requires_grad=True)
    opt = cls([p], lr=1e-2, **kw)
    for t in range(2):
        p.grad = torch.randn(128, 64, generator=torch.Generator().manual_seed(t)).bfloat16()
        opt.step()
    saved = {k: v.dtype for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    again = cls([p], lr=1e-2, **kw)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert {k: v.dtype for k, v in again.state[p].items() if isinstance(v, torch.Tensor)} == saved


def test_apollo_recovers_from_a_zero_first_gradient_and_seeds_groups_added_later():
    p, q = torch.randn(32, 16, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    opt = Apollo([p], lr=1e-2, rank=4)
    opt.add_param_group({"params": [q]})
    p.grad, q.grad = torch.zeros_like(p), torch.randn_like(q)
    opt.step()
    start = p.detach().clone()
    for _ in range(3):
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
    assert (p - start).abs().max() > 0  # a zero first update does not freeze the limiter at zero


def test_group_values_are_checked_and_non_contiguous_parameters_train():
    p = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        GaLoreAdamW([{"params": [p], "rank": 0}])
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit([{"params": [p], "betas": (1.5, 0.9)}])
    t = torch.randn(128, 64).t().requires_grad_()  # 64 x 128, not contiguous
    opt = AdamW8bit([t], lr=1e-2)
    before = t.detach().clone()
    t.grad = torch.randn(64, 128)
    opt.step()
    assert (t - before).abs().max() > 0


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_galore_accumulating_inside_backward_equals_one_batch_between_refreshes(cls):
    """k micro-batch gradients handed over inside backward (``accumulate=True``), then step(), against
    one batch's summed gradient in .grad: equal on steps whose projector stays; a refresh step takes
    its projector from the window's first micro-batch gradient, as documented."""
    kw = dict(lr=0.01, weight_decay=0.05, rank=3, update_proj_gap=3)
    one, micro = _params(), _params()
    big = cls(one, **kw)
    small = cls(micro, accumulate=True, **kw)
    for t in range(4):  # step 1 refreshes (one micro-batch, as the large batch), 2 and 3 keep it, 4 refreshes
        parts = [_grads(10 * t + i, one) for i in range(1 if t == 0 else 3)]
        for j, p in enumerate(one):
            p.grad = sum(part[j] for part in parts)
        big.step()
        for part in parts:  # k backwards: each hands every gradient over as it is made
            for p, grad in zip(micro, part):
                small.update_in_backward(p, grad)
        assert all(p.grad is None for p in micro)
        small.step()
        if t < 3:
            for a, b in zip(one, micro):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, first in zip(micro[:2], parts[0][:2]):  # step 4's projector: the first micro-batch's
        u, _, vh = torch.linalg.svd(first, full_matrices=False)
        want = vh[:3] if p.shape[0] >= p.shape[1] else u[:, :3]
        torch.testing.assert_close(small.state[p]["projector"].abs(), want.abs(), rtol=1e-4, atol=1e-5)


def test_only_galore_accumulates_inside_backward_and_the_rest_say_what_does():
    for opt in (AdamW8bit(_params()), Apollo(_params(), rank=2)):
        p, grad = opt.param_groups[0]["params"][0], _grads(0, _params())[0]
        opt.update_in_backward(p, grad)
        with pytest.raises(RuntimeError, match="gradient accumulation.*'galore-adamw'.*'accumulate': True"):
            opt.update_in_backward(p, grad)
    with pytest.raises(ValueError, match="accumulate must be True or False"):
        GaLoreAdamW(_params(), accumulate=1)


def test_an_accumulating_galore_resumes_mid_run_with_the_same_updates():
    kw = dict(lr=0.01, rank=2, update_proj_gap=3, accumulate=True)
    straight = _params()
    _run(lambda ps: GaLoreAdamW(ps, **kw), 8, straight)
    resumed = _params()
    first = _run(lambda ps: GaLoreAdamW(ps, **kw), 4, resumed)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    _run(lambda ps: _loaded(GaLoreAdamW(ps, **kw), torch.load(buffer, weights_only=True)), 4, resumed, start=4)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_a_window_saved_mid_accumulation_resumes_and_steps():
    """The accumulated gradients and the pending flag are state: an optimizer saved between two
    backwards of one step, loaded into a fresh one, steps with the whole window's sum."""
    kw = dict(lr=0.01, rank=2, update_proj_gap=3, accumulate=True)
    straight, resumed = _params(), _params()
    first, second = _grads(0, straight), _grads(1, straight)
    a = GaLoreAdamW(straight, **kw)
    b = GaLoreAdamW(resumed, **kw)
    for p, q, g in zip(straight, resumed, first):
        a.update_in_backward(p, g)
        b.update_in_backward(q, g)
    buffer = io.BytesIO()
    torch.save(b.state_dict(), buffer)
    buffer.seek(0)
    c = _loaded(GaLoreAdamW(resumed, **kw), torch.load(buffer, weights_only=True))
    for p, q, g in zip(straight, resumed, second):
        a.update_in_backward(p, g)
        c.update_in_backward(q, g)
    a.step()
    c.step()
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
