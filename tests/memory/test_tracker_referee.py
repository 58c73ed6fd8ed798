"""MemoryTracker agrees with torch's MemTracker on real CPU full fine-tuning steps.

MemTracker counts each new storage of every op's outputs until it dies, plus what it is told to
track up front (``track_external``): here the model, the optimizer and the batch, which we give as
``model`` / ``optimizer`` / ``inputs``. Both round nothing on CPU. It raises on frozen parameters,
so the comparison is full fine-tuning only; the two runs are separate (same seed) so that neither
tracker's hooks can change what the other measures.
"""

import functools

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from memopt.memory import MemoryTracker
from tests.memory._tiny import REFEREE_MODELS, ConvNet, call, lm_batch, loss_of, tiny_llama

# The small batches above peak in the optimizer step; these peak in backward, dominated by
# activations, so the comparison also covers saved tensors and backward temporaries.
_MODELS = {
    **REFEREE_MODELS,
    "llama-activations": (tiny_llama, functools.partial(lm_batch, 16, 64)),
    "convnet-activations": (ConvNet, lambda: (torch.randn(256, 3, 16, 16), torch.randint(0, 10, (256,)))),
}

# MemTracker warns about modules it cannot see in BERT's backward; that is its own bookkeeping.
pytestmark = pytest.mark.filterwarnings("ignore:Module is None:UserWarning")

# The agreed tolerance; on this torch both count the same storages at the same op boundaries,
# so the measured difference is 0 bytes.
_REL_TOL = 0.02


def _step(model, opt, batch) -> None:
    loss = loss_of(call(model, batch))
    loss.backward()
    opt.step()
    opt.zero_grad()


def _setup(name: str):
    torch.manual_seed(0)
    make_model, make_batch = _MODELS[name]
    model = make_model()
    return model, torch.optim.AdamW(model.parameters()), make_batch()


def _theirs(name: str) -> tuple[int, dict]:
    model, opt, batch = _setup(name)
    mt = MemTracker()
    mt.track_external(model, opt, batch)
    with mt:
        _step(model, opt, batch)
    snap = mt.get_tracker_snapshot("peak")[torch.device("cpu")]
    return snap["Total"], {k.value if hasattr(k, "value") else k: v for k, v in snap.items()}


def _ours(name: str):
    model, opt, batch = _setup(name)
    with MemoryTracker(model, opt, inputs=batch) as tracker:
        _step(model, opt, batch)
    return tracker.report()


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_peak_agrees_with_torch_memtracker_on_full_fine_tuning(name):
    theirs, snap = _theirs(name)
    ours = _ours(name)
    assert abs(ours.peak_bytes - theirs) <= _REL_TOL * theirs, (ours.peak_bytes, theirs, snap)
    assert ours.peak.parameters == snap["Parameter"]
    assert ours.peak.buffers == snap["Buffer"]
