"""segforge.nn.unet: shapes in 2D/3D, deep supervision, norms, zero-initialised conditioning, gradients, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segforge.nn.unet import UNet, make_norm

STRIDES_3D = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
KERNELS_3D = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
FEATURES = [4, 8, 12, 16]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def net3d(**kw) -> UNet:
    args = dict(spatial_dims=3, in_channels=1, out_channels=3, features_per_stage=FEATURES, kernel_sizes=KERNELS_3D,
                strides=STRIDES_3D)
    args.update(kw)
    torch.manual_seed(0)
    return UNet(**args)


def net2d(**kw) -> UNet:
    args = dict(spatial_dims=2, in_channels=1, out_channels=2, features_per_stage=[4, 8, 16],
                kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]])
    args.update(kw)
    torch.manual_seed(0)
    return UNet(**args)


def test_3d_output_shape_eval():
    net = net3d().eval()
    x = torch.randn(2, 1, 8, 16, 24)
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, 8, 16, 24)
    assert net.total_stride == [4, 8, 8]


def test_2d_output_shape_eval():
    net = net2d().eval()
    with torch.no_grad():
        out = net(torch.randn(3, 1, 16, 20))
    assert out.shape == (3, 2, 16, 20)


def test_deep_supervision_resolutions_follow_cumulative_strides():
    net = net3d().train()
    x = torch.randn(2, 1, 8, 16, 24)
    outs = net(x)
    assert isinstance(outs, list)
    assert len(outs) == len(STRIDES_3D) - 1
    cumulative = [1, 1, 1]
    for out, stride in zip(outs, STRIDES_3D):
        cumulative = [c * s for c, s in zip(cumulative, stride)]
        expected = tuple(n // c for n, c in zip(x.shape[2:], cumulative))
        assert out.shape == (2, 3, *expected)
    sizes = [out[0, 0].numel() for out in outs]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_deep_supervision_full_resolution_output_equals_eval_output_of_same_weights():
    """Train mode with deep supervision returns the eval-mode logits first (instance norm has no running stats)."""
    net = net3d()
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        train_out = net.train()(x)[0]
        eval_out = net.eval()(x)
    torch.testing.assert_close(train_out, eval_out)


def test_without_deep_supervision_train_mode_returns_a_tensor():
    net = net3d(deep_supervision=False).train()
    out = net(torch.randn(1, 1, 8, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 8, 16, 16)
    assert len(net.heads) == 1


def test_extra_input_channels():
    net = net3d(in_channels=3).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 8, 16, 16))
    assert out.shape == (1, 3, 8, 16, 16)
    with pytest.raises(RuntimeError):
        net(torch.randn(1, 1, 8, 16, 16))


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
@pytest.mark.parametrize("dims", [2, 3])
def test_norms_build_and_run(norm, dims):
    net = (net3d if dims == 3 else net2d)(norm=norm)
    x = torch.randn(2, 1, 8, 16, 16) if dims == 3 else torch.randn(2, 1, 16, 16)
    outs = net.train()(x)
    assert all(torch.isfinite(o).all() for o in outs)
    with torch.no_grad():
        out = net.eval()(x)
    assert out.shape[2:] == x.shape[2:]
    assert torch.isfinite(out).all()


def test_make_norm_kinds():
    assert isinstance(make_norm("instance", 3, 8), nn.InstanceNorm3d)
    assert isinstance(make_norm("batch", 2, 8), nn.BatchNorm2d)
    group = make_norm("group", 3, 12)
    assert isinstance(group, nn.GroupNorm) and 12 % group.num_groups == 0
    with pytest.raises(ValueError):
        make_norm("layer", 3, 8)


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_conditioning_is_zero_initialised(norm):
    net = net3d(cond_dim=5, norm=norm).eval()
    x, cond = torch.randn(2, 1, 8, 16, 16), torch.randn(2, 5)
    with torch.no_grad():
        assert torch.equal(net(x), net(x, cond))


def _perturb_conditioning(net: UNet) -> int:
    torch.manual_seed(1)
    count = 0
    for module in net.modules():
        if getattr(module, "cond_proj", None) is not None:
            nn.init.normal_(module.cond_proj.weight)
            nn.init.normal_(module.cond_proj.bias)
            count += 1
    return count


@pytest.mark.parametrize("norm", [
    "instance",
    "batch",
    "group",
])
def test_conditioning_changes_output_once_trained(norm):
    net = net3d(cond_dim=5, norm=norm).eval()
    assert _perturb_conditioning(net) == 2 * len(FEATURES) - 1  # every encoder and decoder block
    x, cond = torch.randn(2, 1, 8, 16, 16), torch.randn(2, 5)
    with torch.no_grad():
        plain, conditioned = net(x), net(x, cond)
        other = net(x, torch.randn(2, 5))
    assert (plain - conditioned).abs().max() > 1e-3
    assert (conditioned - other).abs().max() > 1e-3


def test_cond_without_cond_dim_raises():
    net = net3d().eval()
    with pytest.raises(ValueError, match="cond_dim"):
        net(torch.randn(1, 1, 8, 16, 16), torch.randn(1, 5))


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
@pytest.mark.parametrize("dims", [2, 3])
def test_every_parameter_gets_a_gradient_without_deep_supervision(norm, dims):
    """An unused parameter (e.g. a deep-supervision head nobody calls) breaks DDP."""
    net = (net3d if dims == 3 else net2d)(deep_supervision=False, norm=norm).train()
    x = torch.randn(2, 1, 8, 16, 16) if dims == 3 else torch.randn(2, 1, 16, 16)
    out = net(x)
    target = torch.randint(0, out.shape[1], (out.shape[0], *out.shape[2:]))
    nn.functional.cross_entropy(out, target).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_every_parameter_gets_a_gradient_with_deep_supervision():
    net = net3d().train()
    outs = net(torch.randn(2, 1, 8, 16, 16))
    sum(o.square().mean() for o in outs).backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


def test_every_parameter_gets_a_gradient_with_conditioning():
    net = net3d(cond_dim=4, deep_supervision=False, norm="group").train()
    net(torch.randn(2, 1, 8, 16, 16), torch.randn(2, 4)).square().mean().backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("features,kernels,strides", [
    ([4, 8, 16], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2], [2, 2, 2]]),
    ([4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2], [2, 2, 2]]),
    ([4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2]]),
])
def test_mismatched_lengths_raise(features, kernels, strides):
    with pytest.raises(ValueError):
        UNet(3, 1, 2, features, kernels, strides)


def test_wrong_dimensionality_of_kernels_or_strides_raises():
    with pytest.raises(ValueError):
        UNet(3, 1, 2, [4, 8], [[3, 3], [3, 3]], [[1, 1, 1], [2, 2, 2]])
    with pytest.raises(ValueError):
        UNet(2, 1, 2, [4, 8], [[3, 3], [3, 3]], [[1, 1], [2, 2, 2]])


@pytest.mark.parametrize("encoder,upsample", [("residual", "transposed"), ("plain", "interpolate"),
                                              ("residual", "interpolate")])
def test_variants_keep_shapes_heads_and_gradients(encoder, upsample):
    """The residual encoder and interpolation upsampling change the trunk, not the contract."""
    net = net3d(encoder=encoder, upsample=upsample, blocks_per_stage=[1, 2, 2, 2]).train()
    x = torch.randn(2, 1, 8, 16, 24)
    outs = net(x)
    reference = [tuple(o.shape) for o in net3d().train()(x)]
    assert [tuple(o.shape) for o in outs] == reference
    sum(o.square().mean() for o in outs).backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []
    if encoder == "residual":
        blocks = [len(stage.blocks) for stage in net.encoder]
        assert blocks == [1, 2, 2, 2]
        assert sum(p.numel() for p in net.parameters()) > sum(p.numel() for p in net3d().parameters())


def test_residual_encoder_takes_the_conditioning_zero_initialised():
    net = net3d(encoder="residual", cond_dim=3).eval()
    x, cond = torch.randn(1, 1, 8, 16, 16), torch.randn(1, 3)
    with torch.no_grad():
        assert torch.equal(net(x), net(x, cond))
    assert _perturb_conditioning(net) > len(FEATURES)
    with torch.no_grad():
        assert (net(x) - net(x, cond)).abs().max() > 1e-3


def test_unknown_variants_are_refused():
    with pytest.raises(ValueError, match="encoder"):
        net3d(encoder="dense")
    with pytest.raises(ValueError, match="upsample"):
        net3d(upsample="pixelshuffle")


# --- the denoiser's options: scale-and-shift conditioning, self-attention at the lowest resolutions -----------------


@pytest.mark.parametrize("cond_mode", ["add", "scale_shift"])
@pytest.mark.parametrize("dims", [2, 3])
def test_both_cond_modes_start_as_identity_and_respond_once_trained(cond_mode, dims):
    make = net3d if dims == 3 else net2d
    net = make(cond_dim=6, norm="group", cond_mode=cond_mode, deep_supervision=False).eval()
    plain = make(norm="group", deep_supervision=False).eval()
    plain.load_state_dict(net.state_dict(), strict=False)  # the same trunk weights, no conditioning at all
    x = torch.randn(2, 1, 8, 16, 16) if dims == 3 else torch.randn(2, 1, 16, 16)
    cond = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(net(x, cond), plain(x))
    blocks = len(net.encoder) + len(net.decoder)
    assert _perturb_conditioning(net) == blocks
    width = 2 if cond_mode == "scale_shift" else 1
    assert net.encoder[0].cond_proj.out_features == width * net.encoder[0].convs[0].out_channels
    with torch.no_grad():
        assert (net(x, cond) - plain(x)).abs().max() > 1e-3
        assert (net(x, cond) - net(x, torch.randn(2, 6))).abs().max() > 1e-3


def test_scale_shift_is_a_scale_and_a_shift_of_the_normalised_features():
    from segforge.nn.unet import apply_cond

    proj = nn.Linear(3, 4)
    x, cond = torch.randn(2, 2, 5, 5), torch.randn(2, 3)
    scale, shift = proj(cond).chunk(2, dim=1)
    expected = x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    torch.testing.assert_close(apply_cond(x, proj, cond), expected)


def _attention_modules(net: UNet) -> tuple[list[int], list[int]]:
    from segforge.nn.unet import SelfAttention

    encoder = [i for i, m in enumerate(net.encoder_attention) if isinstance(m, SelfAttention)]
    decoder = [i for i, m in enumerate(net.decoder_attention) if isinstance(m, SelfAttention)]
    return encoder, decoder


@pytest.mark.parametrize("dims", [2, 3])
def test_attention_sits_at_the_lowest_resolutions_and_starts_as_identity(dims):
    make = net3d if dims == 3 else net2d
    stages = len(make().encoder)
    net = make(attention_stages=2, attention_heads=2, norm="group", cond_dim=4, deep_supervision=False).eval()
    encoder, decoder = _attention_modules(net)
    assert encoder == [stages - 2, stages - 1]  # the bottleneck and the stage above it
    assert decoder == [0]                       # the first decoder block works at the stage above the bottleneck
    assert net.decoder[0].convs[0].out_channels == net.encoder[stages - 2].convs[0].out_channels
    plain = make(norm="group", cond_dim=4, deep_supervision=False).eval()
    plain.load_state_dict(net.state_dict(), strict=False)
    x = torch.randn(2, 1, 8, 16, 16) if dims == 3 else torch.randn(2, 1, 16, 16)
    cond = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(net(x, cond), plain(x, cond))
        for index in encoder:
            nn.init.normal_(net.encoder_attention[index].out.weight, std=0.5)
        assert (net(x, cond) - plain(x, cond)).abs().max() > 1e-3
    net.train()(x, cond).square().mean().backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


def test_attention_over_all_stages_and_none():
    net = net2d(attention_stages=3, attention_heads=4, norm="group")
    assert _attention_modules(net) == ([0, 1, 2], [0, 1])
    assert _attention_modules(net2d()) == ([], [])
    # without attention the state dict is the one segmentation models were saved with
    assert not any("attention" in key for key in net2d().state_dict())


def test_denoiser_options_are_validated():
    with pytest.raises(ValueError, match="cond_mode"):
        net2d(cond_dim=4, cond_mode="multiply")
    with pytest.raises(ValueError, match="attention_stages"):
        net2d(attention_stages=4)
    with pytest.raises(ValueError, match="attention_heads"):
        net2d(attention_stages=1, attention_heads=3)
