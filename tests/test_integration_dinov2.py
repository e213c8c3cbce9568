"""fastssl.integrations.dinov2 against the official DINOv2 code (PyPI dinov2 0.0.1.dev2, run
without xformers): its losses, its ViT's multi-crop forward_features_list after patch(), and
patch/unpatch."""

import contextlib
import copy
import importlib
import importlib.util
import pickle
from functools import partial

import pytest
import torch
from accuracy import assert_accurate, assert_close, float32_baseline, output_rounding, worst

import fastssl
from fastssl.integrations import dinov2 as integration
from fastssl.nn import PackedViT

dinov2_loss = pytest.importorskip("dinov2.loss")
from dinov2.layers import attention as dinov2_attention  # noqa: E402
from dinov2.layers import block as dinov2_block  # noqa: E402
from dinov2.models.vision_transformer import DinoVisionTransformer  # noqa: E402

# In a dict, not as module-level names: patch() rebinds module-level names of the upstream's
# classes (the point of it), and these tests need the originals while patched.
UPSTREAM = {"DINOLoss": dinov2_loss.DINOLoss, "iBOTPatchLoss": dinov2_loss.iBOTPatchLoss,
            "KoLeoLoss": dinov2_loss.KoLeoLoss}
K, B = 64, 6


def loss_and_grads(fn, *leaves):
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    loss = fn(*leaves)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def dino_step(loss_module, student_global, student_local, teacher_probs):
    """DINOv2's two DINO terms (ssl_meta_arch): globals against both teacher crops, and each
    local crop against both."""
    return (loss_module([student_global], [teacher_probs])
            + loss_module(list(student_local.chunk(4)), list(teacher_probs.chunk(2))))


def teacher_probabilities(rows, dtype=torch.float64):
    return torch.softmax(torch.randn(rows, K, dtype=dtype) * 3, -1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dino_loss_equals_dinov2(backend):
    student_global, student_local = torch.randn(2 * B, K) * 3, torch.randn(4 * B, K) * 3
    teacher = teacher_probabilities(2 * B)
    theirs, ours = UPSTREAM["DINOLoss"](K), integration.DINOLoss(K)

    def run(module, dtype):
        return lambda g, local: dino_step(module, g, local, teacher.to(dtype))

    with fastssl.use_backend(backend):
        dtype = torch.float64 if backend == "reference" else torch.float32
        got = loss_and_grads(run(ours, dtype), student_global.to(dtype), student_local.to(dtype))
    base, exact = float32_baseline(lambda g, local: loss_and_grads(run(theirs, g.dtype), g, local),
                                   student_global, student_local)
    for index, what in enumerate(("loss", "global gradient", "local gradient")):
        if backend == "reference":  # the same float64 sums in another order
            assert_close(got[index], exact[index], rtol=1e-12, atol=1e-14, what=what)
        else:
            assert_accurate(got[index], base[index], exact[index], atol=output_rounding(exact[index], torch.float32),
                            what=what)


def test_dino_center_and_teacher_targets_over_steps():
    """softmax_center_teacher / update_center / apply_center_update as DINOv2 runs them, in
    float32 (the center is a float32 buffer): the same operations in the same order."""
    theirs, ours = UPSTREAM["DINOLoss"](K, center_momentum=0.8), integration.DINOLoss(K, center_momentum=0.8)
    for _ in range(3):
        teacher = torch.randn(2 * B, K) * 3
        assert_close(ours.softmax_center_teacher(teacher, 0.07), theirs.softmax_center_teacher(teacher, 0.07),
                     what="teacher probabilities")
        theirs.update_center(teacher)
        ours.update_center(teacher)
    theirs.apply_center_update()
    ours.apply_center_update()
    assert_close(ours.center, theirs.center, what="center")
    restored = integration.DINOLoss(K)
    restored.load_state_dict(theirs.state_dict())
    assert_close(restored.center, theirs.center, rtol=0, atol=0)
    back = UPSTREAM["DINOLoss"](K)
    back.load_state_dict(ours.state_dict())
    assert_close(back.center, ours.center, rtol=0, atol=0)


def test_sinkhorn_teacher_equals_dinov2():
    teacher = torch.randn(2 * B, K)
    ours = integration.DINOLoss(K).sinkhorn_knopp_teacher(teacher, 0.1, n_iterations=5)
    theirs = UPSTREAM["DINOLoss"](K).sinkhorn_knopp_teacher
    exact = theirs(teacher.double(), 0.1, n_iterations=5)
    # DINOv2's linear-domain code and fastssl's log domain each round the exponent arguments
    # |t / temp| (relative 2^-24), which moves Q by that much relative.
    assert_accurate(ours, theirs(teacher, 0.1, n_iterations=5), exact,
                    atol=4 * 2**-24 * teacher.abs().max().item() / 0.1, what="Q")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ibot_patch_loss_equals_dinov2(backend):
    images, patches = 3, 10
    masks = torch.rand(images, patches) < 0.4
    masks[:, 0] = True  # every image has a masked patch (DINOv2 masks a fraction of each)
    student, teacher = torch.randn(images, patches, K) * 3, teacher_probabilities(images * patches)
    teacher = teacher.view(images, patches, K)
    theirs, ours = UPSTREAM["iBOTPatchLoss"](K), integration.iBOTPatchLoss(K)
    dtype = torch.float64 if backend == "reference" else torch.float32

    def unmasked(module):
        return lambda s: module(s, teacher.to(s.dtype), masks)

    def masked(module):
        return lambda s: module.forward_masked(s[masks], teacher.to(s.dtype)[masks], masks)

    for what, fn in (("forward", unmasked), ("forward_masked", masked)):
        with fastssl.use_backend(backend):
            got = loss_and_grads(fn(ours), student.to(dtype))
        base, exact = float32_baseline(lambda s: loss_and_grads(fn(theirs), s), student)
        for index, part in enumerate(("loss", "gradient")):
            if backend == "reference":
                # float64 sums in another order; forward_masked's per-patch weights are float32
                # in DINOv2 (1 / a count of patches), whatever the tokens' dtype.
                rtol = 1e-12 if what == "forward" else 4 * 2**-24
                assert_close(got[index], exact[index], rtol=rtol, atol=1e-14, what=f"{what} {part}")
            else:
                assert_accurate(got[index], base[index], exact[index],
                                atol=output_rounding(exact[index], torch.float32), what=f"{what} {part}")


def test_ibot_center_update_and_state_dict():
    theirs, ours = UPSTREAM["iBOTPatchLoss"](K), integration.iBOTPatchLoss(K)
    tokens = torch.randn(1, 20, K)  # DINOv2 passes the masked teacher tokens as (1, n, K)
    theirs.update_center(tokens)
    ours.update_center(tokens)
    assert_close(ours.softmax_center_teacher(tokens[0], 0.07), theirs.softmax_center_teacher(tokens[0], 0.07),
                 what="probabilities after the center update")
    assert_close(ours.center, theirs.center, what="center")
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"center"}
    ours.load_state_dict(theirs.state_dict())


def test_koleo_equals_dinov2():
    x = torch.randn(12, 32, dtype=torch.float64)
    ours, theirs = integration.KoLeoLoss(), UPSTREAM["KoLeoLoss"]()
    got, expected = loss_and_grads(ours, x), loss_and_grads(theirs, x)
    for value, reference in zip(got, expected):
        assert_close(value, reference, rtol=1e-12, atol=1e-14, what="KoLeo")  # float64, the same formula
    assert torch.equal(ours.pairwise_NNs_inner(torch.nn.functional.normalize(x, dim=-1)),
                       theirs.pairwise_NNs_inner(torch.nn.functional.normalize(x, dim=-1)))
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def tiny_dinov2(**overrides):
    """DINOv2's ViT (NestedTensorBlock with MemEffAttention, as vit_small builds it): patch 8,
    head_dim 64, layer scale, blocks in two chunks."""
    options = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, init_values=1e-5,
                   block_chunks=2, block_fn=partial(dinov2_block.NestedTensorBlock,
                                                    attn_class=dinov2_attention.MemEffAttention))
    options.update(overrides)
    model = DinoVisionTransformer(**options)
    with torch.no_grad():  # layer scale 1e-5 would hide the blocks' work from the comparison
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.uniform_(0.5, 1.5)
            if name.endswith("mask_token"):
                parameter.normal_()
    return model


def crops_and_masks():
    crops = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    masks = torch.rand(2, 16) < 0.4
    return crops, [masks, None]


def outputs_and_grads(forward, model, crops):
    crops = [crop.clone().requires_grad_() for crop in crops]
    model.zero_grad()
    outputs = forward(model, crops)
    flat = [o[key] for o in outputs for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm")]
    sum(value.square().mean() for value in flat).backward()
    return [v.detach() for v in flat] + [c.grad for c in crops] + [model.blocks[0][0].attn.qkv.weight.grad]


def per_crop(masks):
    return lambda model, crops: [model.forward_features(crop, m) for crop, m in zip(crops, masks)]


def nested(masks):
    return lambda model, crops: model.forward_features_list(crops, masks)


@pytest.fixture
def without_xformers(monkeypatch):
    """DINOv2 as it runs where xformers is missing: its plain-PyTorch attention (the upstream
    baseline on the CPU, where xformers' kernels do not run) and no nested path."""
    monkeypatch.setattr(dinov2_attention, "XFORMERS_AVAILABLE", False)
    monkeypatch.setattr(dinov2_block, "XFORMERS_AVAILABLE", False)


def test_forward_features_list_runs_on_fastssl_and_equals_the_per_crop_forward(without_xformers):
    model = tiny_dinov2().eval()
    crops, masks = crops_and_masks()
    with pytest.raises(AssertionError, match="xFormers"):  # unpatched, without xformers
        model.forward_features_list(crops, masks)
    exact = outputs_and_grads(per_crop(masks), copy.deepcopy(model).double(), [c.double() for c in crops])
    baselines = [outputs_and_grads(per_crop(masks), model, crops)]  # DINOv2's own attention, per crop
    with integration.patch():
        got = outputs_and_grads(nested(masks), model, crops)
        with fastssl.use_backend("reference"):  # the packed path on the plain-PyTorch attention
            baselines.append(outputs_and_grads(nested(masks), model, crops))
    # The packed path rounds in another order, as validly (see tests/test_packed_vit.py).
    for index, (value, expected) in enumerate(zip(got, exact)):
        base = worst([baseline[index] for baseline in baselines], expected)
        assert_accurate(value, base, expected, atol=1e-5 * expected.abs().max().item(), what=f"output {index}")


def test_packed_vit_takes_masks_as_prepare_tokens_with_masks(without_xformers):
    model = tiny_dinov2().eval()
    crops, masks = crops_and_masks()
    with integration.patch(), torch.no_grad():
        expected = [o["x_norm_clstoken"] for o in model.forward_features_list(crops, masks)]
        packed = PackedViT(model)(crops, masks)
    for got, value in zip(packed, expected):
        assert_close(got[:, 0], value, rtol=1e-5, atol=1e-5, what="CLS tokens")  # the same kernels, float32


def test_stochastic_depth_in_training_runs_and_trains(without_xformers):
    model = tiny_dinov2(drop_path_rate=0.5, block_chunks=0).train()
    crops, masks = crops_and_masks()
    with integration.patch():
        outputs = model.forward_features_list(crops, masks)
        sum(o["x_norm_clstoken"].square().mean() for o in outputs).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.blocks[0].ls1.gamma.grad is not None


def test_memeff_attention_takes_xformers_block_diagonal_mask():
    """fastssl.nn.MemEffAttention (and the patched DINOv2 one) with xformers' own mask, as
    DINOv2 builds it, equal to fastssl's mask."""
    fmha = pytest.importorskip("xformers.ops.fmha")
    attention = fastssl.nn.MemEffAttention(128, num_heads=2, qkv_bias=True)
    x = torch.randn(1, 2 * 7 + 3 * 5, 128)
    seqlens = [7, 7, 5, 5, 5]
    with fastssl.use_backend("triton"):
        theirs = attention(x, attn_bias=fmha.BlockDiagonalMask.from_seqlens(seqlens))
        ours = attention(x, attn_bias=fastssl.nn.BlockDiagonalMask.from_seqlens(seqlens))
    assert torch.equal(theirs, ours)


def test_xformers_helpers_match_their_definitions():
    sources = [torch.randn(4, 6), torch.randn(3, 6)]
    indices = [torch.tensor([2, 0]), torch.tensor([1])]
    assert torch.equal(integration.index_select_cat(sources, indices),
                       torch.cat([sources[0][[2, 0]].flatten(), sources[1][[1]].flatten()]))
    x, source, scaling = torch.randn(4, 5, 6), torch.randn(2, 5, 6), torch.randn(6)
    expected = x.clone()
    expected[[3, 1]] += 2.0 * source * scaling
    assert_close(integration.scaled_index_add(x, torch.tensor([3, 1]), source, scaling, alpha=2.0), expected,
                 rtol=0, atol=0, what="scaled_index_add")


def test_patch_and_unpatch(tmp_path, monkeypatch, without_xformers):
    (tmp_path / "user_script.py").write_text("from dinov2.loss import DINOLoss\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    user_script = importlib.import_module("user_script")
    originals = (dinov2_loss.DINOLoss, dinov2_attention.MemEffAttention.forward, dinov2_block.XFORMERS_AVAILABLE,
                 getattr(dinov2_block, "fmha", None))  # xformers' fmha, or no such name without xformers
    with integration.patch() as patched:
        assert patched.active
        assert dinov2_loss.DINOLoss is integration.DINOLoss and user_script.DINOLoss is integration.DINOLoss
        assert dinov2_loss.iBOTPatchLoss is integration.iBOTPatchLoss
        assert dinov2_loss.KoLeoLoss is integration.KoLeoLoss
        assert dinov2_attention.MemEffAttention.forward is integration.memory_efficient_attention_forward
        assert dinov2_block.XFORMERS_AVAILABLE and dinov2_block.fmha.BlockDiagonalMask is fastssl.nn.BlockDiagonalMask
    assert (dinov2_loss.DINOLoss, dinov2_attention.MemEffAttention.forward, dinov2_block.XFORMERS_AVAILABLE,
            getattr(dinov2_block, "fmha", None)) == originals
    assert user_script.DINOLoss is UPSTREAM["DINOLoss"]
    integration.patch()
    integration.unpatch()
    assert dinov2_loss.DINOLoss is UPSTREAM["DINOLoss"]


def test_bad_input(without_xformers):
    ours = integration.DINOLoss(K)
    with pytest.raises(ValueError, match="lists of \\(B, K\\) tensors of one shape"):
        ours([torch.randn(4, K)], [torch.randn(5, K)])
    with pytest.raises(ValueError, match="must be \\(B, N, K\\)"):
        integration.iBOTPatchLoss(K)(torch.randn(2, 3, K), torch.randn(2, 3, K), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="\\(1, total_tokens, C\\)"), integration.patch():
        tiny_dinov2().blocks[0][0].attn(torch.randn(2, 5, 128), attn_bias=fastssl.nn.BlockDiagonalMask([(2, 5)]))
    with pytest.raises(ValueError, match="prepare_tokens_with_masks"):
        import timm

        vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1,
                                                               num_heads=1, dynamic_img_size=True)
        PackedViT(vit)([torch.randn(1, 3, 32, 32)], [torch.ones(1, 16, dtype=torch.bool)])



# ----------------------------------------------------------------------------- models built before patching


@pytest.fixture
def ssl_meta_arch(monkeypatch):
    """DINOv2's SSLMetaArch with a tiny backbone. Its module imports fvcore's checkpointers
    (through dinov2.train and dinov2.fsdp), unused by the model: stand-ins let it import
    without fvcore installed."""
    import os
    import sys
    import types

    import dinov2
    from dinov2.models import vision_transformer as vits

    if importlib.util.find_spec("fvcore") is None:
        checkpoint = types.ModuleType("fvcore.common.checkpoint")
        checkpoint.Checkpointer = checkpoint.PeriodicCheckpointer = object
        for name in ("fvcore", "fvcore.common"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, checkpoint.__name__, checkpoint)
    train = types.ModuleType("dinov2.train")  # its __init__ imports the training script
    train.__path__ = [os.path.join(os.path.dirname(dinov2.__file__), "train")]
    monkeypatch.setitem(sys.modules, "dinov2.train", train)
    monkeypatch.setattr(vits, "vit_small", lambda **kwargs: tiny_dinov2(**dict(kwargs, init_values=1e-5)))
    omegaconf = pytest.importorskip("omegaconf")
    from dinov2.configs import dinov2_default_config
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    monkeypatch.delitem(sys.modules, "dinov2.train.ssl_meta_arch")
    cfg = omegaconf.OmegaConf.merge(dinov2_default_config, dict(
        student=dict(arch="vit_small", patch_size=8, block_chunks=2), crops=dict(global_crops_size=32),
        compute_precision=dict(grad_scaler=False),
        dino=dict(head_n_prototypes=K, head_hidden_dim=32, head_bottleneck_dim=16, koleo_loss_weight=0.1)))
    return SSLMetaArch(cfg)


Identity = torch.nn.Identity  # BlockChunk pads chunks with it


def module_types(model):
    return {name: type(module) for name, module in model.named_modules()}


def test_patch_a_built_ssl_meta_arch_in_place_and_unpatch_it(ssl_meta_arch, tmp_path):
    model = ssl_meta_arch
    types_before, keys = module_types(model), list(model.state_dict())
    attributes = {name: dict(vars(module)) for name, module in model.named_modules()}
    tensors = [*model.parameters(), *model.buffers()]
    assert integration.patch(model=model) is model
    assert type(model.dino_loss) is integration.DINOLoss and type(model.ibot_patch_loss) is integration.iBOTPatchLoss
    assert type(model.koleo_loss) is integration.KoLeoLoss
    for backbone in (model.student.backbone, model.teacher.backbone):
        for block in (block for chunk in backbone.blocks for block in chunk if not isinstance(block, Identity)):
            assert isinstance(block, dinov2_block.NestedTensorBlock) and type(block).__module__ == integration.__name__
            assert isinstance(block.attn, dinov2_attention.MemEffAttention)  # as DINOv2 asserts
            assert type(block.attn).forward is integration.memory_efficient_attention_forward
    assert all(a is b for a, b in zip([*model.parameters(), *model.buffers()], tensors))
    assert list(model.state_dict()) == keys
    torch.save(model.state_dict(), tmp_path / "patched.pt")
    assert integration.unpatch(model=model) is model
    assert module_types(model) == types_before
    assert {name: dict(vars(module)) for name, module in model.named_modules()} == attributes
    model.load_state_dict(torch.load(tmp_path / "patched.pt"))  # saved patched, loaded unpatched
    integration.patch(model=model).load_state_dict(torch.load(tmp_path / "patched.pt"))  # and back
    assert dinov2_loss.DINOLoss is UPSTREAM["DINOLoss"]  # patching a model leaves DINOv2's names alone


class Losses(torch.nn.Module):
    """A backbone and DINOv2's losses, as SSLMetaArch holds them."""

    def __init__(self):
        super().__init__()
        self.backbone = tiny_dinov2(drop_path_rate=0.5, block_chunks=0)
        self.dino_loss, self.ibot_patch_loss = dinov2_loss.DINOLoss(K), dinov2_loss.iBOTPatchLoss(K)
        self.head = torch.nn.Linear(128, K)

    def step(self, crops, masks):
        outputs = self.backbone.forward_features_list(crops, masks)
        cls = self.head(outputs[0]["x_norm_clstoken"])
        patches = self.head(outputs[0]["x_norm_patchtokens"])
        teacher = self.dino_loss.softmax_center_teacher(cls.detach(), 0.07)
        self.dino_loss.update_center(cls.detach())
        patch_teacher = self.ibot_patch_loss.softmax_center_teacher(patches.detach(), 0.07)
        self.ibot_patch_loss.update_center(patches.detach())
        return self.dino_loss([cls], [teacher]) + self.ibot_patch_loss(patches, patch_teacher, masks[0])


def test_patch_a_built_model_equals_patching_before_the_build(without_xformers):
    torch.manual_seed(1)
    model = Losses().train()
    model.dino_loss.reduce_center_update(torch.randn(4, K))  # a center update pending when patching
    built_patched = copy.deepcopy(model)
    crops, masks = crops_and_masks()
    integration.patch(model=model)
    assert dinov2_block.XFORMERS_AVAILABLE is False  # the module stays DINOv2's
    assert module_types(pickle.loads(pickle.dumps(model))) == module_types(model)  # the swapped classes by name
    folded_center = {name: value.clone() for name, value in model.dino_loss.state_dict().items()}
    built_patched.dino_loss.apply_center_update()  # the swap folded the pending update in as DINOv2 does
    assert torch.equal(folded_center["center"], built_patched.dino_loss.center)
    results = []
    for run_model, patching in ((model, contextlib.nullcontext()), (built_patched, integration.patch())):
        torch.manual_seed(2)  # the same stochastic depth draws
        with patching, fastssl.use_backend("reference"):
            if run_model is built_patched:  # losses as patch() before the build makes them
                run_model.dino_loss = integration.DINOLoss(K)
                run_model.dino_loss.load_state_dict(folded_center)
                run_model.ibot_patch_loss = integration.iBOTPatchLoss(K)
            losses = [run_model.step(crops, masks) for _ in range(2)]
            losses[-1].backward()
        results.append((losses, run_model.backbone.blocks[0].attn.qkv.weight.grad, run_model.dino_loss.center))
    for ours, theirs in zip(results[0], results[1]):
        for a, b in zip(ours if isinstance(ours, list) else [ours], theirs if isinstance(theirs, list) else [theirs]):
            assert torch.equal(a, b)
