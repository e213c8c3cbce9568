import functools
import inspect
import sys
import types

import pytest
import torch
from accuracy import assert_accurate, float32_baseline, output_rounding

import fastssl
from fastssl.integrations import diffsort as diffsort_integration
from fastssl.nn import DiffSortNet as FastDiffSortNet

diffsort = pytest.importorskip("diffsort")

# In a dict: patch() rebinds every module-level name that refers to diffsort's class, this
# module's too, and these tests need the original while patched.
UPSTREAM = {"DiffSortNet": diffsort.DiffSortNet}

BACKENDS = ["reference", "triton", "cpp"]
# (network, size, distribution, steepness, art_lambda): a power of two and not (bitonic pads
# to one), every network, the default distribution and the one that reads art_lambda (set
# off its default, so that a lost argument shows). Steepness stays small: a near-tie
# amplifies each float32 rounding by up to steepness / pi (see test_soft_sort.py).
CASES = [
    ("bitonic", 5, "cauchy", 2.0, 0.25),
    ("bitonic", 8, "logistic_phi", 1.0, 0.5),
    ("odd_even", 6, "logistic", 2.0, 0.25),
    ("odd_even", 8, "cauchy", 1.0, 0.25),
]


@pytest.fixture(autouse=True)
def restore_diffsort():
    """A failing test must not leave diffsort patched for the tests after it."""
    yield
    diffsort_integration.unpatch()


@pytest.fixture
def user_script(monkeypatch):
    """A module that ran ``from diffsort import DiffSortNet`` before anything was patched."""
    module = types.ModuleType("user_training_script")
    exec("from diffsort import DiffSortNet", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def diffsort_arguments(network, size, distribution, steepness, art_lambda):
    """diffsort's constructor arguments, all positional (device, interpolation_type in their places)."""
    return network, size, "cpu", steepness, art_lambda, None, distribution


def sort_and_gradient(sorter, x, grad_sorted, grad_P):
    x = x.detach().clone().requires_grad_()
    x_sorted, P = sorter(x)
    ((x_sorted * grad_sorted).sum() + (P * grad_P).sum()).backward()
    return x_sorted.detach(), P.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network,size,distribution,steepness,art_lambda", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_values_and_gradients_equal_diffsort(backend, network, size, distribution, steepness, art_lambda):
    arguments = diffsort_arguments(network, size, distribution, steepness, art_lambda)
    x = torch.randn(3, size) * 2  # Gaussian rows: near-ties and clear orders both occur
    grad_sorted, grad_P = torch.randn(3, size), torch.randn(3, size, size)
    # exact: diffsort in float64; baseline: the worst of diffsort in float32 and simulated
    # float32 roundings of it.
    baseline, exact = float32_baseline(functools.partial(sort_and_gradient, UPSTREAM["DiffSortNet"](*arguments)),
                                       x, grad_sorted, grad_P)
    with fastssl.use_backend(backend):
        actual = sort_and_gradient(diffsort_integration.DiffSortNet(*arguments), x, grad_sorted, grad_P)
    for value, base, expected, what in zip(actual, baseline, exact, ("x_sorted", "P", "gradient")):
        assert value.dtype == torch.float32
        assert_accurate(value, base, expected, atol=output_rounding(expected, torch.float32), what=what)


def test_constructor_is_diffsorts():
    def parameters(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert parameters(diffsort_integration.DiffSortNet) == parameters(UPSTREAM["DiffSortNet"])
    assert issubclass(diffsort_integration.DiffSortNet, FastDiffSortNet)  # an adapter over fastssl.nn's module


@pytest.mark.parametrize("arguments", [
    dict(sorting_network_type="bitonic", size=7),
    dict(sorting_network_type="odd_even", size=6, device="cpu", steepness=5.0, art_lambda=0.5,
         distribution="logistic_phi"),
    dict(sorting_network_type="bitonic", size=4, interpolation_type="gaussian"),  # diffsort's deprecated alias
    dict(sorting_network_type="bitonic", size=4, interpolation_type="reciprocal", distribution=None),
], ids=["defaults", "every-argument", "interpolation-type", "interpolation-type-no-distribution"])
def test_attributes_and_state_dict_are_diffsorts(arguments):
    upstream, ours = UPSTREAM["DiffSortNet"](**arguments), diffsort_integration.DiffSortNet(**arguments)
    for name in ("sorting_network_type", "size", "steepness", "art_lambda", "distribution"):
        assert getattr(ours, name) == getattr(upstream, name), name
    assert len(ours.sorting_network) == len(upstream.sorting_network)
    for our_layer, upstream_layer in zip(ours.sorting_network, upstream.sorting_network):
        assert all(torch.equal(a, b) for a, b in zip(our_layer, upstream_layer))
    # Both state dicts are empty (diffsort keeps its matrices in a plain list); each loads into the other.
    assert list(ours.state_dict()) == list(upstream.state_dict())
    ours.load_state_dict(upstream.state_dict())
    upstream.load_state_dict(ours.state_dict())


def test_sorting_network_can_be_replaced_as_scripts_do():
    ours = diffsort_integration.DiffSortNet("bitonic", 4)
    moved = [[matrix.clone() for matrix in layer] for layer in ours.sorting_network]
    ours.sorting_network = moved
    assert ours.sorting_network is moved


def test_patch_and_unpatch(user_script):
    ours = diffsort_integration.DiffSortNet
    patch = diffsort_integration.patch()
    assert patch.active and diffsort_integration.patch() is patch  # patching twice is a no-op
    assert diffsort.DiffSortNet is ours and diffsort.diffsort.DiffSortNet is ours
    assert user_script.DiffSortNet is ours  # imported before patch(), rebound by it
    assert type(diffsort.DiffSortNet("bitonic", 4)) is ours
    diffsort_integration.unpatch()
    for name_holder in (diffsort, diffsort.diffsort, user_script):
        assert name_holder.DiffSortNet is UPSTREAM["DiffSortNet"]


def test_patch_as_a_context_manager(user_script):
    with diffsort_integration.patch():
        assert diffsort.DiffSortNet is diffsort_integration.DiffSortNet
        assert user_script.DiffSortNet is diffsort_integration.DiffSortNet
    assert diffsort.DiffSortNet is UPSTREAM["DiffSortNet"] and user_script.DiffSortNet is UPSTREAM["DiffSortNet"]


@pytest.mark.parametrize("arguments,error,message", [
    (dict(size=1), NotImplementedError, "size=1: fastssl's sorting kernels need size >= 2"),
    (dict(steepness=torch.tensor(10.0)), NotImplementedError, "a tensor steepness is not supported"),
    (dict(art_lambda=torch.tensor(0.25)), NotImplementedError, "a tensor art_lambda is not supported"),
    (dict(sorting_network_type="merge"), NotImplementedError, "Sorting network `merge` unknown"),
    (dict(distribution="laplace"), NotImplementedError, "distribution `laplace` unknown"),
    (dict(distribution=None), NotImplementedError, "distribution `None` unknown"),
    (dict(distribution="logistic", interpolation_type="gaussian"), ValueError, "Two different distributions"),
], ids=["size-1", "tensor-steepness", "tensor-art-lambda", "network", "distribution", "no-distribution",
        "conflicting-alias"])
def test_unsupported_options_raise_clearly(arguments, error, message):
    arguments = dict(dict(sorting_network_type="bitonic", size=4), **arguments)
    with pytest.raises(error, match=message):
        diffsort_integration.DiffSortNet(**arguments)


# ----------------------------------------------------------------------------- sorters built before patching


class Ranker(torch.nn.Module):
    """A model holding a diffsort sorter, as a training script builds it."""

    def __init__(self):
        super().__init__()
        self.score = torch.nn.Linear(3, 1)
        self.sorter = UPSTREAM["DiffSortNet"]("odd_even", 6, steepness=2.0, distribution="logistic")

    def forward(self, items):
        return self.sorter(self.score(items).squeeze(-1))


def test_patch_a_built_sorter_in_place_equals_patching_before_the_build():
    model = Ranker()
    sorter, matrices, keys = model.sorter, model.sorter.sorting_network, list(model.state_dict())
    assert diffsort_integration.patch(model=model) is model
    assert model.sorter is sorter and type(sorter) is diffsort_integration.DiffSortNet
    assert sorter.sorting_network is matrices and list(model.state_dict()) == keys
    with diffsort_integration.patch():
        built_patched = diffsort.DiffSortNet("odd_even", 6, steepness=2.0, distribution="logistic")
    items = torch.randn(4, 6, 3)
    with fastssl.use_backend("reference"):
        for ours, theirs in zip(model(items), built_patched(model.score(items).squeeze(-1))):
            assert torch.equal(ours, theirs)


def test_unpatch_a_model_restores_diffsorts_sorter_exactly(tmp_path):
    model = Ranker()
    attributes = dict(vars(model.sorter))
    torch.save(diffsort_integration.patch(model=model).state_dict(), tmp_path / "patched.pt")
    diffsort_integration.unpatch(model=model)
    assert type(model.sorter) is UPSTREAM["DiffSortNet"] and vars(model.sorter) == attributes
    model.load_state_dict(torch.load(tmp_path / "patched.pt"))  # saved patched, loaded unpatched
    with diffsort_integration.patch():
        built_patched = diffsort.DiffSortNet("bitonic", 4)
    diffsort_integration.unpatch(model=built_patched)  # a sorter built while patched, too
    assert type(built_patched) is UPSTREAM["DiffSortNet"] and len(built_patched.sorting_network) == 3
    assert diffsort.DiffSortNet is UPSTREAM["DiffSortNet"]  # patching a model leaves diffsort's names alone


def test_patching_a_sorter_the_kernels_cannot_serve_changes_nothing():
    model = Ranker()
    model.sorter.steepness = torch.tensor(2.0)
    with pytest.raises(ValueError, match="sorter \\(DiffSortNet\\): a tensor steepness is not supported"):
        diffsort_integration.patch(model=model)
    assert type(model.sorter) is UPSTREAM["DiffSortNet"] and "sorting_network" in vars(model.sorter)
