import copy

import pytest
import torch
from accuracy import assert_accurate, assert_close, worst
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

import fastssl
from fastssl.nn import BlockDiagonalMask, MemEffAttention, MultiCropAttention, PackedViT, pack_crops, unpack_crops
from fastssl.nn.packed_vit import add_residual

ATOL = 1e-5  # float32 units at the O(1) magnitudes of LayerNorm'd activations


def tiny_vit(**kwargs):
    """Head dim 64 (the kernels' main case), two resolutions of patch 8, CLS + a register."""
    options = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=0,
                   dynamic_img_size=True, reg_tokens=1)
    options.update(kwargs)
    return VisionTransformer(**options)


def crops(dtype=torch.float32):
    return [torch.randn(2, 3, 32, 32, dtype=dtype), torch.randn(3, 3, 16, 16, dtype=dtype)]


def test_pack_unpack_round_trip_and_mask():
    groups = [torch.randn(2, 5, 4), torch.randn(3, 2, 4)]
    packed, mask = pack_crops(groups)
    assert packed.shape == (16, 4)
    assert mask.seqlens == [5, 5, 2, 2, 2] and mask.max_seqlen == 5
    assert mask.q_seqinfo.seqstart_py == [0, 5, 10, 12, 14, 16]
    assert mask.cu_seqlens().dtype == torch.int32
    for got, expected in zip(unpack_crops(packed, mask), groups):
        assert_close(got, expected, rtol=0, atol=0)
    assert BlockDiagonalMask.from_seqlens([5, 5, 2, 2, 2]).groups == ((2, 5), (3, 2))
    assert [tuple(t.shape) for t in mask.split(packed[None])] == [(2, 5, 4), (3, 2, 4)]


@pytest.mark.parametrize("groups,message", [
    ([], "at least one crop group"),
    ([torch.randn(2, 5, 4), torch.randn(3, 2, 6)], r"crop group 1 must be \(b, n, 4\)"),
    ([torch.randn(2, 5)], r"crop group 0 must be \(b, n, 5\)"),
])
def test_pack_crops_bad_input(groups, message):
    with pytest.raises(ValueError, match=message):
        pack_crops(groups)


def test_timm_vit_needs_dynamic_img_size():
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        PackedViT(tiny_vit(dynamic_img_size=False))


def _attention_pair(qk_norm=False):
    timm_attention = Attention(128, num_heads=2, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm)
    ours = MultiCropAttention(128, num_heads=2, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm)
    ours.load_state_dict(timm_attention.state_dict())
    return timm_attention, ours


@pytest.mark.parametrize("qk_norm", [False, True])
def test_multicrop_attention_equals_timm(qk_norm):
    timm_attention, ours = _attention_pair(qk_norm)
    x = torch.randn(3, 37, 128)
    exact = copy.deepcopy(timm_attention).double()(x.double())
    assert_accurate(ours(x), timm_attention(x), exact, atol=ATOL, what="attention")


def test_memeff_attention_with_block_diagonal_mask():
    ours = MemEffAttention(128, num_heads=2, qkv_bias=True)
    sequences = [torch.randn(1, n, 128) for n in (7, 7, 50, 1)]
    mask = BlockDiagonalMask.from_seqlens([s.shape[1] for s in sequences])
    out = ours(torch.cat(sequences, dim=1), attn_bias=mask)
    reference = copy.deepcopy(ours).double()
    exact = torch.cat([MultiCropAttention.forward(reference, s.double()) for s in sequences], dim=1)
    with fastssl.use_backend("reference"):
        baseline = torch.cat([MultiCropAttention.forward(ours, s) for s in sequences], dim=1)
    assert_accurate(out, baseline, exact, atol=ATOL, what="packed attention")
    with pytest.raises(ValueError, match=r"x must be \(1, total_tokens, C\)"):
        ours(torch.randn(2, 7, 128), attn_bias=BlockDiagonalMask([(2, 7)]))


def test_usable_as_timm_attn_layer():
    vit = tiny_vit(attn_layer=MultiCropAttention)
    assert vit.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 18, 128)


def features_and_grads(forward, vit, images):
    images = [x.clone().requires_grad_() for x in images]
    vit.zero_grad()
    outputs = forward(vit, images)
    sum(out.square().mean() for out in outputs).backward()
    return outputs, [x.grad for x in images], vit.blocks[0].attn.qkv.weight.grad


def per_resolution(vit, images):
    return [vit.forward_features(x) for x in images]


def packed(vit, images):
    return PackedViT(vit)(images)


def packed_on_the_reference_backend(vit, images):
    with fastssl.use_backend("reference"):
        return packed(vit, images)


def test_packed_vit_equals_per_resolution_forward():
    vit = tiny_vit().eval()
    images = crops()
    got = features_and_grads(packed, vit, images)
    exact = features_and_grads(per_resolution, copy.deepcopy(vit).double(), [x.double() for x in images])
    # The float32 baseline: the worse of two plain-PyTorch runs, timm's per resolution and the
    # packed one on the reference attention. Packing runs every linear layer and LayerNorm on
    # one (tokens, C) matrix instead of (B, N, C) batches, which rounds in another order as
    # validly; its error dominates (the weight gradient, formed by cancellation to 1e-3 of its
    # terms, differs by up to 2.3x between the two PyTorch runs). The Triton path differs from
    # the packed reference run in the attention alone.
    baselines = [features_and_grads(per_resolution, vit, images),
                 features_and_grads(packed_on_the_reference_backend, vit, images)]
    for what, index in [("features", 0), ("image gradients", 1)]:
        for crop, (value, expected) in enumerate(zip(got[index], exact[index])):
            assert value.shape == expected.shape
            base = worst([baseline[index][crop] for baseline in baselines], expected)
            assert_accurate(value, base, expected, atol=ATOL * expected.abs().max().item(), what=what)
    base = worst([baseline[2] for baseline in baselines], exact[2])
    assert_accurate(got[2], base, exact[2], atol=ATOL * exact[2].abs().max().item(), what="weight gradient")


def test_stochastic_depth_runs_the_branch_on_kept_images_only():
    mask = BlockDiagonalMask([(4, 3), (8, 2)])
    x = torch.randn(mask.total_tokens, 5)
    drop_path = torch.nn.Module()
    drop_path.drop_prob = 0.5
    out = add_residual(x, mask, lambda t, m: 2 * t, drop_path, training=True)
    for got, before, (b, _) in zip(mask.split(out), mask.split(x), mask.groups):
        kept = max(int(b * 0.5), 1)
        changed = (got != before).flatten(1).any(1)
        assert int(changed.sum()) == kept  # b' images got the branch ...
        assert_close(got[changed], before[changed] * (1 + 2 * b / kept))  # ... scaled by b / b'
    assert torch.equal(add_residual(x, mask, lambda t, m: 2 * t, drop_path, training=False), 3 * x)


def test_packed_vit_trains_with_stochastic_depth():
    vit = tiny_vit(drop_path_rate=0.5).train()
    outputs = PackedViT(vit)(crops())
    assert [tuple(o.shape) for o in outputs] == [(2, 18, 128), (3, 6, 128)]
    sum(o.square().mean() for o in outputs).backward()
    assert torch.isfinite(vit.blocks[1].mlp.fc1.weight.grad).all()
