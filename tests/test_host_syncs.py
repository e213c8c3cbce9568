"""No op or loss module makes the host wait for the GPU in its forward or backward.

On a GPU, reading a tensor's values on the host (``.item()``, ``bool()``, ``.tolist()``, a
copy to the CPU) or an op whose output size depends on the values (``nonzero``, boolean
indexing, ``unique``) stalls the host until the device has run everything queued before:
the CPU stops queuing kernels and the GPU then idles. ``torch.cuda.set_sync_debug_mode``
flags them on a GPU; here, on the CPU, :class:`HostSyncs` flags the same:

- the host-reading Tensor methods when fastssl's own code calls them (they are wrapped, and
  the caller's module is checked: torch's and the Triton interpreter's own calls are theirs),
  inside custom ops too, where dispatch modes do not reach;
- the synchronizing aten ops, by a dispatch mode, outside custom ops.

``host_reads_are_free`` is patched to False, so the ops take their GPU paths (device-side
asserts instead of host reads, cu_seqlens unvalidated).
"""

import contextlib
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastssl
import fastssl._checks
from fastssl import nn, ops

aten = torch.ops.aten
SYNCHRONIZING_ATEN_OPS = {aten._local_scalar_dense, aten.is_nonzero, aten.item, aten.nonzero, aten.masked_select,
                          aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.equal}
HOST_READING_METHODS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")


class HostSyncs(TorchDispatchMode):
    """The synchronizing aten ops run while active; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNCHRONIZING_ATEN_OPS or _boolean_index(func, args):
            self.found.append(f"aten {func}")
        return func(*args, **(kwargs or {}))


def _boolean_index(func, args) -> bool:
    return func.overloadpacket in (aten.index, aten.index_put) and any(
        isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1] if index is not None)


@pytest.fixture
def host_syncs(monkeypatch):
    """A HostSyncs whose ``watching()`` block records host reads by fastssl and synchronizing
    aten ops, with the ops on their GPU paths and the Triton backend."""
    detector = HostSyncs()
    watching = False

    def wrap(name, method):
        def reading(self, *args, **kwargs):
            caller = sys._getframe(1)
            if watching and caller.f_globals.get("__name__", "").startswith("fastssl"):
                detector.found.append(f"Tensor.{name} in {caller.f_code.co_filename}:{caller.f_lineno}")
            return method(self, *args, **kwargs)
        return reading

    for name in HOST_READING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(fastssl._checks, "host_reads_are_free", lambda value: False)

    @contextlib.contextmanager
    def watch():
        nonlocal watching
        watching = True
        try:
            with fastssl.use_backend("triton"), detector:
                yield
        finally:
            watching = False

    detector.watching = watch
    return detector


def _rows(*shape, grad=True):
    return torch.randn(*shape).requires_grad_(grad)


def _backward(*losses):
    sum(loss.float().sum() for loss in losses).backward()


def _dino(watching):
    student, teacher, center = _rows(4 * 3, 20), _rows(2 * 3, 20, grad=False), torch.zeros(20)
    loss, head = nn.DINOLoss(20, 4, 0.04, 0.04, 0, 2), nn.DINOHeadLoss(20, 4, 0.04, 0.04, 0, 2, chunk_size=8)
    features, weight = _rows(4 * 3, 8), _rows(20, 8)
    with watching():
        _backward(ops.dino_cross_entropy(student, teacher, 4, 2, 0.1, 0.04, center)[0])
        _backward(loss(student, teacher, 1), loss(student, teacher, 1))
        _backward(head(features, weight, features[: 2 * 3].detach(), weight.detach(), 0))


def _ibot_and_koleo(watching):
    masks = torch.rand(3, 10) < 0.5
    masks[:, 0] = True
    weights = (1 / masks.sum(-1, keepdim=True)).expand_as(masks)[masks]  # DINOv2's collate computes these
    n = int(masks.sum())
    student, teacher, loss = _rows(n, 20), _rows(n, 20, grad=False), nn.IBOTPatchLoss(20)
    embeddings = _rows(6, 8)
    with watching():
        _backward(loss.forward_masked(student, teacher, masks, masks_weight=weights, teacher_temp=0.04),
                  nn.KoLeoLoss()(embeddings))


def _swav(watching):
    loss = nn.SwAVLoss(crops_for_assign=(0, 1), n_crops=3, queue_length=8, embedding_dim=4)
    prototypes = torch.nn.Linear(4, 6, bias=False)
    steps = [torch.nn.functional.normalize(torch.randn(3 * 4, 4), dim=1) for _ in range(3)]
    scores, problems = torch.randn(16, 12), torch.randn(3, 5, 4)
    with watching():
        nn.SinkhornKnopp()(scores)
        ops.sinkhorn_knopp(problems, n_iters=30)
        for embeddings in steps:  # the queue fills, then is used
            _backward(loss(prototypes(embeddings), embeddings, prototypes.weight))


def _barlow_and_vicreg(watching):
    z1, z2 = _rows(8, 20), _rows(8, 20)
    with watching():
        for formulation in ("gram", "cross"):
            _backward(nn.BarlowTwinsLoss(formulation=formulation)(z1, z2),
                      nn.VICRegLoss(formulation=formulation)(z1, z2))


def _contrastive(watching):
    q, k = _rows(8, 16), _rows(8, 16)
    with watching():
        _backward(nn.NTXentLoss()(q, k), nn.InfoNCELoss(0.2)(q, k), ops.info_nce(q, k, 0.1, symmetric=True))


def _attention(watching):
    qkv, cu_seqlens = _rows(20, 3, 2, 32), torch.tensor([0, 5, 20], dtype=torch.int32)
    memory_efficient, multi_crop = nn.MemEffAttention(64, num_heads=2), nn.MultiCropAttention(64, num_heads=2)
    mask = nn.BlockDiagonalMask([(2, 5), (3, 4)])
    mask.cu_seqlens("cpu")  # offsets are copied to the device once per mask
    packed, batch = _rows(1, 22, 64), _rows(2, 7, 64)
    with watching():
        _backward(ops.varlen_attention(*qkv.unbind(1), cu_seqlens, max_seqlen=15))
        _backward(memory_efficient(packed, mask), multi_crop(batch))


def _sorting(watching):
    x, y, student, teacher = _rows(6, 9), _rows(6, 9), _rows(6, 8), _rows(6, 8, grad=False)
    sorter = nn.DiffSortNet("bitonic", 9, steepness=10.0)
    loss = nn.NeCoLoss(dim=8, n_references=4, queue_size=16, steepness_student=10.0, steepness_teacher=10.0)
    steps = [(_rows(2, 5, 8), _rows(2, 5, 8, grad=False)) for _ in range(3)]
    with watching():
        x_sorted, P = ops.soft_sort(x, 10.0)
        sorted_rows, matrices = sorter(y)
        _backward(x_sorted, P, sorted_rows, matrices, ops.neco_loss(student, teacher, 10.0, 10.0))
        for student_features, teacher_features in steps:  # the queue fills, then gives the references
            _backward(loss(student_features, teacher_features))
            loss.update_queue(teacher_features)


STEPS = {"dino": _dino, "ibot_and_koleo": _ibot_and_koleo, "swav": _swav, "barlow_and_vicreg": _barlow_and_vicreg,
         "contrastive": _contrastive, "attention": _attention, "sorting": _sorting}


@pytest.mark.parametrize("step", list(STEPS))
def test_no_host_synchronization(host_syncs, step):
    STEPS[step](host_syncs.watching)
    assert host_syncs.found == []


def test_the_detector_sees_host_reads(host_syncs, monkeypatch):
    """The same checks with host reads allowed (the CPU's path) are seen: the test can fail."""
    monkeypatch.setattr(fastssl._checks, "host_reads_are_free", lambda value: True)
    _barlow_and_vicreg(host_syncs.watching)
    assert any("Tensor.__bool__" in found for found in host_syncs.found)
    host_syncs.found.clear()
    q, k, v = torch.randn(3, 20, 2, 32).unbind(0)
    with host_syncs.watching():
        ops.varlen_attention(q, k, v, torch.tensor([0, 5, 20], dtype=torch.int32))
    assert any("Tensor.item" in found for found in host_syncs.found)


def _with_bad_value(value, *shape):
    x = torch.randn(*shape)
    x[1, 3] = value
    return x


@pytest.mark.parametrize("op,args,name", [
    (ops.info_nce, (torch.randn(4, 8), _with_bad_value(float("nan"), 4, 8), 0.1), "key"),
    (ops.soft_sort, (_with_bad_value(float("inf"), 4, 8),), "x"),
    (ops.barlow_twins_loss, (_with_bad_value(float("nan"), 4, 8), torch.randn(4, 8)), "z1"),
    (ops.sinkhorn_knopp, (_with_bad_value(float("inf"), 4, 8),), "scores"),
])
def test_bad_input_still_stops_the_op_without_a_host_read(host_syncs, op, args, name):
    """The GPU path's check is a device-side assert; on the CPU torch raises it at once."""
    with host_syncs.watching(), pytest.raises(RuntimeError, match=f"{name} contains NaN or Inf"):
        op(*args)
    assert host_syncs.found == []


@pytest.mark.gpu
def test_bad_input_on_a_gpu_stops_at_the_next_synchronization():
    """On a GPU the device-side assert ends the process's use of the device, so it runs apart."""
    script = ("import torch\nfrom fastssl import ops\nx = torch.randn(4, 8, device='cuda')\nx[1, 3] = float('nan')\n"
              "ops.soft_sort(x)\ntorch.cuda.synchronize()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "device-side assert" in result.stderr or "x contains NaN or Inf" in result.stderr, result.stderr[-2000:]
