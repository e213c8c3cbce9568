"""fastssl.integrations.lightly against the real lightly package: values, gradients and state
over several steps on the reference (float64) and triton (float32, accuracy rule) backends,
signatures, attributes and state dicts, patch/unpatch, bad input, and the distributed
``gather_distributed`` semantics on two gloo processes."""

import functools
import importlib
import inspect
import sys

import pytest
import torch
from accuracy import assert_accurate, assert_close, float32_baseline, output_rounding
from distributed import run_distributed

import fastssl

lightly_loss = pytest.importorskip("lightly.loss")
from lightly.loss import swav_loss as lightly_swav  # noqa: E402

from fastssl.integrations import lightly as integration  # noqa: E402
from fastssl.integrations._patching import Patch  # noqa: E402

# Where lightly defines each replaced name.
DEFINING_MODULES = {
    "DINOLoss": "lightly.loss.dino_loss", "SwaVLoss": "lightly.loss.swav_loss",
    "BarlowTwinsLoss": "lightly.loss.barlow_twins_loss", "VICRegLoss": "lightly.loss.vicreg_loss",
    "IBOTPatchLoss": "lightly.loss.ibot_loss", "KoLeoLoss": "lightly.loss.koleo_loss",
}
# In a dict, not as module-level names: patch() rebinds module-level names of lightly's
# classes (the point of it), and these tests need the originals while patched.
UPSTREAM = {name: getattr(lightly_loss, name) for name in DEFINING_MODULES}
UPSTREAM["sinkhorn"] = lightly_swav.sinkhorn

K, B = 32, 6  # prototypes (output_dim) and images
BACKENDS = ["reference", "triton"]
# Constructor arguments away from the defaults, so that a mapping mistake shows.
DINO_ARGS = dict(output_dim=K, warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_epochs=3,
                 student_temp=0.2, center_momentum=0.8)
IBOT_ARGS = dict(output_dim=K, teacher_temp=0.05, student_temp=0.2, center_momentum=0.8)


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with lightly's own classes installed."""
    integration.unpatch()
    yield
    integration.unpatch()


def dtype_of(backend):
    return torch.float64 if backend == "reference" else torch.float32


def loss_and_grads(fn, *leaves):
    """``fn(*leaves)`` and its gradients with respect to fresh copies of ``leaves``."""
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    loss = fn(*leaves)
    # Zeros for a leaf the loss does not depend on (SwaV's only high-resolution crop).
    return (loss.detach(), *torch.autograd.grad(loss.sum(), leaves, materialize_grads=True))


def assert_equal_float64(got, expected, names):
    # Both sides in float64: the same function with its sums in another order (or an
    # equivalent form: Sinkhorn in the log domain, the covariance penalty in Gram form), a few
    # hundred roundings of 1.1e-16 amplified by well-conditioned O(1) quantities: 1e-12 of
    # the largest magnitude (at least 1) leaves a wide margin for any input.
    for value, exact, name in zip(got, expected, names):
        assert value.dtype == torch.float64, f"{name}: {value.dtype}"
        assert_close(value, exact, rtol=1e-12, atol=1e-12 * max(1.0, exact.abs().max().item()), what=name)


def assert_matches(backend, got, lightly_fn, tensors, names):
    """``got``: fastssl's outputs on ``tensors`` in the backend's dtype; ``lightly_fn``: lightly's
    computation of the same outputs. Reference (float64): equal up to float64 rounding.
    Triton (float32): the accuracy rule against lightly's float64 run, with lightly's float32
    runs (real and simulated) as the baseline and float32 output rounding as atol."""
    if backend == "reference":
        assert_equal_float64(got, lightly_fn(*(tensor.double() for tensor in tensors)), names)
        return
    base, exact = float32_baseline(lightly_fn, *tensors)
    for value, baseline, exact_value, name in zip(got, base, exact, names):
        assert value.dtype == torch.float32, f"{name}: {value.dtype}"
        assert_accurate(value, baseline, exact_value, atol=output_rounding(exact_value, torch.float32), what=name)


# ----------------------------------------------------------------------------- DINO


DINO_STEPS = [dict(epoch=0), dict(epoch=1), dict(teacher_temp=0.07), dict(epoch=5), {}]


def dino_step(module, teacher, student, **forward_kwargs):
    """One step of a DINO loss module: (loss, student gradient (S, B, K), center after)."""
    loss, grad = loss_and_grads(lambda s: module(list(teacher.unbind(0)), list(s.unbind(0)), **forward_kwargs),
                                student)
    return loss, grad, module.center.detach().clone()


def lightly_dino_step(center, teacher, student, **forward_kwargs):
    """lightly's DINOLoss from the given center: one step, as :func:`dino_step`."""
    module = UPSTREAM["DINOLoss"](**DINO_ARGS)
    module.center = center.clone()
    return dino_step(module, teacher, student, **forward_kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_teacher,n_student", [(2, 2), (2, 5), (1, 3), (3, 2)])
def test_dino_loss_equals_lightly_over_steps(backend, n_teacher, n_student):
    dtype = dtype_of(backend)
    ours, theirs = integration.DINOLoss(**DINO_ARGS), UPSTREAM["DINOLoss"](**DINO_ARGS)
    for step, forward_kwargs in enumerate(DINO_STEPS):
        teacher, student = torch.randn(n_teacher, B, K) * 3, torch.randn(n_student, B, K) * 3
        center_before = ours.center.clone()
        with fastssl.use_backend(backend):
            got = dino_step(ours, teacher.to(dtype), student.to(dtype), **forward_kwargs)
        names = [f"step {step} {part}" for part in ("loss", "gradient", "center")]
        if backend == "reference":  # both modules carry their own center through the steps
            assert_equal_float64(got, dino_step(theirs, teacher.double(), student.double(), **forward_kwargs), names)
        else:  # per step from fastssl's center, so that float32 errors do not accumulate
            lightly_fn = functools.partial(lightly_dino_step, **forward_kwargs)
            assert_matches(backend, got, lightly_fn, (center_before, teacher, student), names)


def test_dino_update_center_equals_lightly():
    ours, theirs = integration.DINOLoss(**DINO_ARGS), UPSTREAM["DINOLoss"](**DINO_ARGS)
    for _ in range(3):
        teacher = torch.randn(2, B, K)
        ours.update_center(teacher)
        theirs.update_center(teacher)
        assert_close(ours.center, theirs.center, what="center")  # the same float32 operations


# ----------------------------------------------------------------------------- iBOT


def random_mask(images=4, height=3, width=3):
    mask = torch.rand(images, height, width) < 0.4
    mask[0, 0, 0] = True  # some patch is masked; other images may have none (lightly's clamp)
    return mask


def ibot_step(module, teacher, student, mask, **forward_kwargs):
    loss, grad = loss_and_grads(lambda s: module(teacher, s, mask, **forward_kwargs), student)
    return loss, grad, module.center.value.detach().clone()


def lightly_ibot_step(center, teacher, student, mask, **forward_kwargs):
    module = UPSTREAM["IBOTPatchLoss"](**IBOT_ARGS)
    module.center.center = center.clone()
    return ibot_step(module, teacher, student, mask, **forward_kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_patch_loss_equals_lightly_over_steps(backend):
    dtype = dtype_of(backend)
    ours, theirs = integration.IBOTPatchLoss(**IBOT_ARGS), UPSTREAM["IBOTPatchLoss"](**IBOT_ARGS)
    for step, forward_kwargs in enumerate([{}, dict(teacher_temp=0.03), {}]):
        mask = random_mask()
        teacher, student = torch.randn(int(mask.sum()), K) * 3, torch.randn(int(mask.sum()), K) * 3
        center_before = ours.center.value.clone()
        with fastssl.use_backend(backend):
            got = ibot_step(ours, teacher.to(dtype), student.to(dtype), mask, **forward_kwargs)
        names = [f"step {step} {part}" for part in ("loss", "gradient", "center")]
        if backend == "reference":
            # lightly's per-patch weights are float32 (1 / a count) in float64 runs too, and
            # fastssl passes the op the same weights: float64 rounding only.
            assert_equal_float64(got, ibot_step(theirs, teacher.double(), student.double(), mask, **forward_kwargs),
                                 names)
        else:
            lightly_fn = functools.partial(lightly_ibot_step, mask=mask, **forward_kwargs)
            assert_matches(backend, got, lambda c, t, s: lightly_fn(c, t, s), (center_before, teacher, student),
                           names)


# ----------------------------------------------------------------------------- KoLeo


def separated_neighbours(pairs=4, dim=16):
    """(2 * pairs, dim) rows whose nearest neighbours are far from ties: pairs of directions
    at cosine 0.995, orthogonal to every other row, at random norms. (KoLeo's nearest
    neighbour is an argmax; near a tie its gradient jumps, so random rows would fail for
    rare seeds.)"""
    basis = torch.linalg.qr(torch.randn(dim, 2 * pairs, dtype=torch.float64))[0].t()  # orthonormal rows
    anchors, offsets = basis[:pairs], basis[pairs:]
    rows = torch.cat([anchors, anchors + 0.1 * offsets])
    return rows * (0.5 + torch.rand(2 * pairs, 1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_koleo_equals_lightly(dtype):
    x = separated_neighbours()
    got = loss_and_grads(integration.KoLeoLoss(eps=1e-6), x.to(dtype))
    # fastssl's KoLeo has no kernel (DINOv2's formula in at least float32): the same on every
    # backend, so the dtype picks the comparison.
    assert_matches("reference" if dtype == torch.float64 else "triton", got,
                   lambda rows: loss_and_grads(UPSTREAM["KoLeoLoss"](eps=1e-6), rows), (x,), ["loss", "gradient"])


def test_koleo_computes_16_bit_input_in_float32():
    x = separated_neighbours()
    loss = integration.KoLeoLoss()(x.bfloat16())
    assert loss.dtype == torch.float32
    assert_close(loss, UPSTREAM["KoLeoLoss"]()(x.bfloat16().float()), what="loss")  # the same float32 operations


# ----------------------------------------------------------------------------- SwaV


def cosine_scores(*shape):
    return torch.rand(*shape) * 2 - 1  # prototype scores of normalized features, as in SwaV


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gather_distributed", [False, True])  # one process: no difference
def test_sinkhorn_equals_lightly(backend, gather_distributed):
    scores = cosine_scores(B, K)
    with fastssl.use_backend(backend):
        q = integration.sinkhorn(scores.to(dtype_of(backend)), 4, 0.1, gather_distributed)
    assert_matches(backend, [q], lambda s: [UPSTREAM["sinkhorn"](s, 4, 0.1, gather_distributed)], (scores,), ["Q"])


def test_sinkhorn_keeps_lightlys_dtype_and_stays_finite():
    scores = cosine_scores(B, K)
    assert integration.sinkhorn(scores.half()).dtype == torch.float16
    large = scores * 10  # exp(10 / 0.05) overflows float32: lightly returns NaN
    assert torch.isnan(UPSTREAM["sinkhorn"](large)).any()
    q = integration.sinkhorn(large)
    assert torch.isfinite(q).all()
    assert_close(q.sum(1), torch.ones(B), what="rows of Q")


def run_lightly_swav(n_high, queue, *crops, **constructor_kwargs):
    module = UPSTREAM["SwaVLoss"](**constructor_kwargs)
    return module(list(crops[:n_high]), list(crops[n_high:]), queue)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_high,n_low", [(2, 0), (2, 3), (1, 2)])
def test_swav_loss_equals_lightly(backend, n_high, n_low):
    dtype = dtype_of(backend)
    kwargs = dict(temperature=0.2, sinkhorn_iterations=4, sinkhorn_epsilon=0.07)
    ours = integration.SwaVLoss(**kwargs)
    # The queue is the caller's (lightly keeps no queue in the loss): several steps with and
    # without one.
    for step, queue_length in enumerate([None, 5, 5]):
        crops = [cosine_scores(B, K) for _ in range(n_high + n_low)]
        queue = None if queue_length is None else [cosine_scores(queue_length, K) for _ in range(n_high)]

        def fastssl_swav(*crops):
            return ours(list(crops[:n_high]), list(crops[n_high:]),
                        None if queue is None else [q.to(crops[0].dtype) for q in queue])

        with fastssl.use_backend(backend):
            got = loss_and_grads(fastssl_swav, *(crop.to(dtype) for crop in crops))
        assert got[0].shape == (1,)  # lightly's shape

        def lightly_fn(*crops):
            queue_in_dtype = None if queue is None else [q.to(crops[0].dtype) for q in queue]
            return loss_and_grads(functools.partial(run_lightly_swav, n_high, queue_in_dtype, **kwargs), *crops)

        names = [f"step {step} loss"] + [f"step {step} crop {i} gradient" for i in range(len(crops))]
        assert_matches(backend, got, lightly_fn, crops, names)


def test_swav_subloss_equals_lightly():
    z, q = torch.randn(B, K, dtype=torch.float64), integration.sinkhorn(torch.randn(B, K, dtype=torch.float64))
    with fastssl.use_backend("reference"):
        got = integration.SwaVLoss(temperature=0.3).subloss(z, q)
    assert_equal_float64([got], [UPSTREAM["SwaVLoss"](temperature=0.3).subloss(z, q)], ["subloss"])


# ----------------------------------------------------------------------------- Barlow Twins and VICReg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,dim", [(8, 24), (24, 8)])  # the Gram form (N < D) and the cross form
def test_barlow_twins_equals_lightly(backend, n, dim):
    z_a, z_b = torch.randn(n, dim), torch.randn(n, dim) + 0.5 * torch.randn(n, 1)
    with fastssl.use_backend(backend):
        got = loss_and_grads(integration.BarlowTwinsLoss(lambda_param=0.02), z_a.to(dtype_of(backend)),
                             z_b.to(dtype_of(backend)))
    lightly_fn = functools.partial(loss_and_grads, UPSTREAM["BarlowTwinsLoss"](lambda_param=0.02))
    assert_matches(backend, got, lightly_fn, (z_a, z_b), ["loss", "gradient z_a", "gradient z_b"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(8, 24), (24, 8), (6, 2, 3, 16)])  # Gram, cross, VICRegL-like positions
def test_vicreg_equals_lightly(backend, shape):
    z_a = torch.randn(shape) * 0.7  # some variances below 1 and some above: both sides of the hinge
    z_b = z_a + 0.3 * torch.randn(shape)
    kwargs = dict(lambda_param=20.0, mu_param=15.0, nu_param=2.0)
    with fastssl.use_backend(backend):
        got = loss_and_grads(integration.VICRegLoss(**kwargs), z_a.to(dtype_of(backend)), z_b.to(dtype_of(backend)))
    lightly_fn = functools.partial(loss_and_grads, UPSTREAM["VICRegLoss"](**kwargs))
    assert_matches(backend, got, lightly_fn, (z_a, z_b), ["loss", "gradient z_a", "gradient z_b"])


# ----------------------------------------------------------------------------- the lightly interface

CONSTRUCTIONS = [("DINOLoss", dict(output_dim=K)), ("IBOTPatchLoss", dict(output_dim=K)), ("SwaVLoss", {}),
                 ("BarlowTwinsLoss", {}), ("VICRegLoss", {}), ("KoLeoLoss", {})]


def parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", [*DEFINING_MODULES, "sinkhorn"])
def test_signatures_equal_lightly(name):
    ours, theirs = getattr(integration, name), UPSTREAM[name]
    if name == "sinkhorn":
        assert parameters(ours) == parameters(theirs)
        return
    assert parameters(ours.__init__) == parameters(theirs.__init__)
    assert parameters(ours.forward) == parameters(theirs.forward)
    public_methods = {m for m in dir(theirs) if not m.startswith("_") and callable(getattr(theirs, m))}
    assert public_methods <= set(dir(ours)), public_methods - set(dir(ours))


def assert_same_value(ours, theirs, what):
    if isinstance(theirs, torch.Tensor):
        assert_close(ours, theirs, rtol=0, atol=0, what=what)
    elif isinstance(theirs, torch.nn.Module):
        assert type(ours) is type(theirs), what
        assert_same_attributes(ours, theirs, what)
    elif not callable(theirs):
        assert ours == theirs, f"{what}: {ours!r} != {theirs!r}"


MODULE_INTERNALS = set(vars(torch.nn.Module()))  # hooks, parameter and buffer tables, ...


def assert_same_attributes(ours, theirs, what):
    """lightly's attributes (functions by presence), submodules and buffers, with the same values."""
    for name, value in vars(theirs).items():
        if name in MODULE_INTERNALS:
            continue
        assert hasattr(ours, name), f"{what}.{name} is missing"
        assert_same_value(getattr(ours, name), value, f"{what}.{name}")
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys(), what
    for name, module in theirs.named_children():
        assert_same_value(getattr(ours, name), module, f"{what}.{name}")


@pytest.mark.parametrize("name,kwargs", CONSTRUCTIONS)
def test_attributes_equal_lightly(name, kwargs):
    assert_same_attributes(getattr(integration, name)(**kwargs), UPSTREAM[name](**kwargs), name)


@pytest.mark.parametrize("name,kwargs", CONSTRUCTIONS)
def test_state_dicts_load_both_ways(name, kwargs):
    theirs, ours = UPSTREAM[name](**kwargs), getattr(integration, name)(**kwargs)
    for buffer in theirs.buffers():  # a trained center, not zeros
        buffer.copy_(torch.randn_like(buffer))
    ours.load_state_dict(theirs.state_dict())
    restored = UPSTREAM[name](**kwargs)
    restored.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, rtol=0, atol=0, what=f"lightly -> fastssl {key}")
        assert_close(restored.state_dict()[key], value, rtol=0, atol=0, what=f"fastssl -> lightly {key}")
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_trained_dino_center_loads_into_lightly():
    ours = integration.DINOLoss(**DINO_ARGS)
    ours([torch.randn(B, K) for _ in range(2)], [torch.randn(B, K) for _ in range(4)], epoch=0)
    theirs = UPSTREAM["DINOLoss"](**DINO_ARGS)
    theirs.load_state_dict(ours.state_dict())
    teacher, student = [torch.randn(B, K) for _ in range(2)], [torch.randn(B, K) for _ in range(4)]
    # The same center and float32 inputs: lightly's loss up to float32 rounding of the sums.
    assert_close(ours(teacher, student), theirs(teacher, student), rtol=1e-5, atol=1e-6, what="loss")


# ----------------------------------------------------------------------------- patching


def assert_installed(replacements: bool):
    for name, module_name in DEFINING_MODULES.items():
        expected = getattr(integration, name) if replacements else UPSTREAM[name]
        assert getattr(lightly_loss, name) is expected, name
        assert getattr(importlib.import_module(module_name), name) is expected, f"{module_name}.{name}"
    assert lightly_swav.sinkhorn is (integration.sinkhorn if replacements else UPSTREAM["sinkhorn"])


def test_patch_and_unpatch():
    patched = integration.patch()
    assert isinstance(patched, Patch) and patched.active
    assert_installed(True)
    assert integration.patch() is patched  # patching twice changes nothing
    loss = lightly_loss.DINOLoss(K)
    assert isinstance(loss, integration.DINOLoss)
    integration.unpatch()
    assert_installed(False)


def test_patch_as_context_manager():
    with integration.patch() as patched:
        assert patched.active
        assert_installed(True)
    assert not patched.active
    assert_installed(False)


def test_patch_rebinds_names_imported_before(tmp_path, monkeypatch):
    (tmp_path / "lightly_user_script.py").write_text(
        "from lightly.loss import DINOLoss\nfrom lightly.loss.swav_loss import sinkhorn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    user_script = importlib.import_module("lightly_user_script")
    try:
        with integration.patch():
            assert user_script.DINOLoss is integration.DINOLoss
            assert user_script.sinkhorn is integration.sinkhorn
        assert user_script.DINOLoss is UPSTREAM["DINOLoss"]
        assert user_script.sinkhorn is UPSTREAM["sinkhorn"]
    finally:
        monkeypatch.delitem(sys.modules, "lightly_user_script")


def test_lightlys_own_swav_loss_uses_the_patched_sinkhorn():
    crops = [cosine_scores(B, K).double() for _ in range(3)]
    # Built before patching: lightly's __init__ calls super(SwaVLoss, self), which names the
    # class through the module global that patch() rebinds (documented in the module).
    theirs = UPSTREAM["SwaVLoss"]()
    with fastssl.use_backend("reference"):
        expected = integration.SwaVLoss()(crops[:2], crops[2:])
        with integration.patch():
            got = theirs(crops[:2], crops[2:])  # looks sinkhorn up in its module
    assert_equal_float64([got], [expected], ["loss"])


# ----------------------------------------------------------------------------- bad input


def views(*shapes):
    return [torch.randn(shape) for shape in shapes]


BAD_INPUTS = [
    ("DINOLoss", lambda m: m([], views((B, K))), ValueError, "teacher_out is empty"),
    ("DINOLoss", lambda m: m(views((B, K), (B + 1, K)), views((B, K))), ValueError, "tensors of one shape"),
    ("DINOLoss", lambda m: m(views((B, K + 1)), views((B, K + 1), (B, K + 1))), ValueError, f"output_dim={K}"),
    ("DINOLoss", lambda m: m(views((B, K)), views((B + 1, K), (B + 1, K))), ValueError, r"\(batch_size, output_dim"),
    ("DINOLoss", lambda m: m(views((B, K)), views((B, K))), ValueError, "at least two views"),
    ("DINOLoss", lambda m: m([torch.randn(B, K, requires_grad=True)] * 2, views((B, K))), ValueError,
     "would backpropagate into the teacher"),
    ("DINOLoss", lambda m: m([torch.ones(B, K, dtype=torch.long)] * 2, views((B, K))), TypeError, "must be float"),
    ("IBOTPatchLoss", lambda m: m(torch.randn(3, K), torch.randn(3, K), torch.ones(1, 1, 3)), ValueError,
     "bool tensor"),
    ("IBOTPatchLoss", lambda m: m(torch.randn(3, K), torch.randn(3, K), torch.ones(1, 2, 2, dtype=torch.bool)),
     ValueError, "mask sets 4 patches but teacher_out and student_out hold 3 rows"),
    ("IBOTPatchLoss", lambda m: m(torch.randn(3, K), torch.randn(4, K), torch.ones(1, 1, 3, dtype=torch.bool)),
     ValueError, "must be \\(masked patches, output_dim"),
    ("IBOTPatchLoss", lambda m: m(torch.randn(3, K, requires_grad=True), torch.randn(3, K),
                                  torch.ones(1, 1, 3, dtype=torch.bool)), ValueError, "into the teacher"),
    ("SwaVLoss", lambda m: m([], views((B, K), (B, K))), ValueError, "at least one high-resolution crop"),
    ("SwaVLoss", lambda m: m(views((B, K)), []), ValueError, "two crops in all"),
    ("SwaVLoss", lambda m: m(views((B, K)), views((B + 1, K))), ValueError, "of one shape"),
    ("SwaVLoss", lambda m: m(views((B, K), (B, K)), [], views((5, K))), ValueError, "one tensor per high-resolution"),
    ("SwaVLoss", lambda m: m(views((B, K)), views((B, K)), views((5, K + 1))), ValueError, r"\(queue_length, 32\)"),
    ("SwaVLoss", lambda m: m([torch.full((B, K), float("nan"))], views((B, K))), ValueError, "NaN"),
    ("BarlowTwinsLoss", lambda m: m(torch.randn(B, K), torch.randn(B, K + 1)), ValueError, "of one shape"),
    ("BarlowTwinsLoss", lambda m: m(torch.randn(1, K), torch.randn(1, K)), ValueError, "at least 2 samples"),
    ("VICRegLoss", lambda m: m(torch.randn(1, K), torch.randn(1, K)), AssertionError, "batch size > 1"),
    ("VICRegLoss", lambda m: m(torch.randn(B, K), torch.randn(B, K + 1)), AssertionError, "same shape"),
    ("KoLeoLoss", lambda m: m(torch.randn(1, K)), ValueError, r"\(B >= 2, D\)"),
]


@pytest.mark.parametrize("name,call,error,message", BAD_INPUTS)
def test_bad_input(name, call, error, message):
    kwargs = dict(CONSTRUCTIONS)[name]
    with pytest.raises(error, match=message):
        call(getattr(integration, name)(**kwargs))


@pytest.mark.parametrize("call,error,message", [
    (lambda: integration.sinkhorn(torch.randn(2, B, K)), ValueError, r"\(batch_size, n_prototypes\)"),
    (lambda: integration.sinkhorn(torch.randn(B, K), iterations=0), ValueError, "iterations must be >= 1"),
    (lambda: integration.sinkhorn(torch.randn(B, K), epsilon=0.0), ValueError, "epsilon must be"),
    (lambda: integration.SwaVLoss(temperature=-1.0), ValueError, "temperature must be"),
    (lambda: integration.DINOLoss(K, center_mode="median"), ValueError, "Unknown mode 'median'"),
    (lambda: integration.IBOTPatchLoss(K, center_mode="median"), ValueError, "Unknown mode 'median'"),
    # Configurations lightly has and fastssl cannot compute:
    (lambda: integration.KoLeoLoss(p=1), NotImplementedError, "p=2"),
    (lambda: integration.VICRegLoss(eps=1e-3), NotImplementedError, "eps=0.0001"),
])
def test_bad_arguments_and_unsupported_configurations(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ----------------------------------------------------------------------------- distributed


def _gather_semantics_worker(rank, world_size, scores, z_a, z_b, teacher, student):
    """On each rank of a 2-process gloo group: every ``gather_distributed`` setting against
    lightly's own code on the same local batch, in float64."""
    local = [tensor.chunk(world_size, dim=-2)[rank] for tensor in (scores, z_a, z_b)]
    scores, z_a, z_b = local
    with fastssl.use_backend("reference"):
        codes = {}
        for gather in (False, True):
            codes[gather] = integration.sinkhorn(scores, gather_distributed=gather)
            expected = UPSTREAM["sinkhorn"](scores.clone(), gather_distributed=gather)
            assert_equal_float64([codes[gather]], [expected], [f"sinkhorn gather={gather}"])
            kwargs = dict(sinkhorn_gather_distributed=gather)
            got = loss_and_grads(lambda *c: integration.SwaVLoss(**kwargs)(list(c[:2]), list(c[2:])), scores, scores)
            expected = loss_and_grads(lambda *c: UPSTREAM["SwaVLoss"](**kwargs)(list(c[:2]), list(c[2:])), scores,
                                      scores)
            assert_equal_float64(got, expected, [f"SwaV gather={gather} {part}" for part in ("loss", "g0", "g1")])
            got = loss_and_grads(integration.VICRegLoss(gather_distributed=gather), z_a, z_b)
            expected = loss_and_grads(UPSTREAM["VICRegLoss"](gather_distributed=gather), z_a, z_b)
            assert_equal_float64(got, expected, [f"VICReg gather={gather} {part}" for part in ("loss", "ga", "gb")])
        assert not torch.allclose(codes[False], codes[True])  # the two settings do differ here
        got = loss_and_grads(integration.BarlowTwinsLoss(), z_a, z_b)
        expected = loss_and_grads(UPSTREAM["BarlowTwinsLoss"](), z_a, z_b)
        assert_equal_float64(got, expected, ["Barlow Twins loss", "ga", "gb"])
        try:
            integration.BarlowTwinsLoss(gather_distributed=True)(z_a, z_b)
            raise AssertionError("BarlowTwinsLoss(gather_distributed=True) ran over two processes")
        except NotImplementedError as error:
            assert "averages per-process cross-correlations" in str(error)
        # The DINO center is averaged over processes (lightly does so whenever initialized).
        ours, theirs = integration.DINOLoss(K), UPSTREAM["DINOLoss"](K)
        views = [v.chunk(world_size)[rank] for v in teacher], [v.chunk(world_size)[rank] for v in student]
        assert_equal_float64([ours(*views)], [theirs(*views)], ["DINO loss"])
        assert_equal_float64([ours.center], [theirs.center], ["DINO center"])


def test_gather_distributed_semantics_on_two_processes():
    teacher = [torch.randn(2 * B, K, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(2 * B, K, dtype=torch.float64) for _ in range(3)]
    run_distributed(_gather_semantics_worker, cosine_scores(2 * B, K).double(),
                    torch.randn(2 * B, K, dtype=torch.float64), torch.randn(2 * B, K, dtype=torch.float64),
                    teacher, student)



# ----------------------------------------------------------------------------- losses built before patching


def lightly_losses():
    """A LightningModule holding one of each lightly loss as attributes, as lightly's examples do."""
    pl = pytest.importorskip("pytorch_lightning")
    module = pl.LightningModule()
    module.projection = torch.nn.Linear(K, K)
    for name in DEFINING_MODULES:
        setattr(module, name.lower(), getattr(lightly_loss, name)(**dict(DINOLoss=DINO_ARGS, IBOTPatchLoss=IBOT_ARGS)
                                                                  .get(name, {})))
    module.ntxentloss = lightly_loss.NTXentLoss(temperature=0.2)
    return module


def module_classes(module):
    return {name: type(child) for name, child in module.named_children()}


def test_patch_built_losses_in_place_equals_patching_before_the_build():
    module = lightly_losses()
    losses = dict(module.named_children())
    tensors, keys = [*module.parameters(), *module.buffers()], list(module.state_dict())
    with integration.patch():
        built_patched = lightly_losses()
    assert integration.patch(model=module) is module
    assert module_classes(module) == module_classes(built_patched)
    assert dict(module.named_children()) == losses  # the same loss objects, swapped in place
    assert all(a is b for a, b in zip([*module.parameters(), *module.buffers()], tensors))
    assert list(module.state_dict()) == keys
    built_patched.load_state_dict(module.state_dict())
    teacher, student = torch.randn(2, B, K), torch.randn(3, B, K)
    mask = torch.zeros(B, 2, 2, dtype=torch.bool)
    mask[:, 0, 0] = True
    with fastssl.use_backend("reference"):
        for losses_of in (module, built_patched):  # each step moves the centers: compare after two
            for _ in range(2):
                values = [losses_of.dinoloss(list(teacher), list(student), epoch=1),
                          losses_of.ibotpatchloss(teacher[0], student[0], mask),
                          losses_of.swavloss(list(student[:2]), list(student[2:])),
                          losses_of.barlowtwinsloss(student[0], student[1]),
                          losses_of.vicregloss(student[0], student[1]), losses_of.koleoloss(student[0]),
                          losses_of.ntxentloss(student[0], student[1])]
            losses_of.values = values
    for ours, theirs in zip(module.values, built_patched.values):
        assert torch.equal(ours, theirs)
    for name, value in built_patched.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name


def test_unpatch_restores_lightlys_losses_exactly(tmp_path):
    module = lightly_losses()
    attributes = {name: dict(vars(child)) for name, child in module.named_children()}
    integration.patch(model=module)
    torch.save(module.state_dict(), tmp_path / "patched.pt")
    assert integration.unpatch(model=module) is module
    assert module_classes(module) == module_classes(lightly_losses())
    assert {name: dict(vars(child)) for name, child in module.named_children()} == attributes
    module.load_state_dict(torch.load(tmp_path / "patched.pt"))  # saved patched, loaded unpatched
    torch.save(module.state_dict(), tmp_path / "unpatched.pt")
    integration.patch(model=lightly_losses()).load_state_dict(torch.load(tmp_path / "unpatched.pt"))  # and back
    with integration.patch():
        built_patched = lightly_losses()
    integration.unpatch(model=built_patched)  # losses built while patched, too
    assert module_classes(built_patched) == module_classes(module)
    assert lightly_loss.DINOLoss is UPSTREAM["DINOLoss"]  # patching a model leaves lightly's names alone


def test_patching_a_loss_fastssl_cannot_serve_changes_nothing():
    module = lightly_losses()
    module.koleoloss = lightly_loss.KoLeoLoss(p=1)
    classes = module_classes(module)
    with pytest.raises(ValueError, match="koleoloss \\(KoLeoLoss\\): p=1"):
        integration.patch(model=module)
    assert module_classes(module) == classes
