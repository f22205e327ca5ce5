"""Encoder/decoder blocks, the PatchGAN discriminator and the GAN loss helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentgen.errors import SpecError
from latentgen.tokenizers.discriminator import ActNorm, NLayerDiscriminator
from latentgen.tokenizers.losses import (
    adaptive_weight,
    d_loss,
    g_loss,
    gan_weight_ramp,
    reconstruction_loss,
)
from latentgen.tokenizers.networks import (
    AttnBlock,
    Decoder,
    Encoder,
    ResnetBlock,
    Upsample,
    group_norm,
)


def arch(**kw):
    base = dict(
        ch=16,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        z_channels=4,
        resolution=16,
        dropout=0.0,
        num_groups=8,
    )
    base.update(kw)
    return base


# -- shapes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ch_mult", "in_channels", "size"),
    [((1, 2), 3, (16, 16)), ((1, 1, 2), 7, (16, 24)), ((1, 2, 2, 4), 1, (32, 16))],
)
def test_encoder_decoder_shapes(ch_mult, in_channels, size):
    f = 2 ** (len(ch_mult) - 1)
    kw = arch(ch_mult=ch_mult, resolution=32, attn_resolutions=(32 // f,))
    enc = Encoder(in_channels=in_channels, **kw)
    dec = Decoder(out_channels=in_channels, **kw)
    x = torch.randn(2, in_channels, *size)
    z = enc(x)
    assert z.shape == (2, 4, size[0] // f, size[1] // f)
    assert dec(z).shape == x.shape


def test_double_z_doubles_latent_channels():
    enc = Encoder(in_channels=3, double_z=True, **arch())
    assert enc(torch.randn(1, 3, 16, 16)).shape == (1, 8, 8, 8)


def test_attention_placed_only_at_requested_resolutions():
    kw = arch(ch_mult=(1, 1, 2), resolution=32, attn_resolutions=(16,))
    enc, dec = Encoder(in_channels=3, **kw), Decoder(out_channels=3, **kw)
    # Levels are 32, 16, 8: only level 1 gets attention, one block per ResNet block.
    assert [len(level.attn) for level in enc.down] == [0, 1, 0]
    assert [len(level.attn) for level in dec.up] == [0, 2, 0]
    assert [hasattr(level, "downsample") for level in enc.down] == [True, True, False]
    assert [hasattr(level, "upsample") for level in dec.up] == [False, True, True]


def test_resolution_not_divisible_is_a_spec_error():
    with pytest.raises(SpecError, match="multiple of the downsample factor 4"):
        Encoder(in_channels=3, **arch(ch_mult=(1, 1, 2), resolution=18))


@pytest.mark.parametrize(("channels", "groups"), [(128, 32), (16, 16), (48, 16), (3, 1)])
def test_group_norm_falls_back_to_a_divisor(channels, groups):
    norm = group_norm(channels, 32)
    assert norm.num_groups == groups and norm.eps == 1e-6


# -- blocks against straightforward formulas ------------------------------------------------------
def test_attn_block_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(16, num_groups=8)
    x = torch.randn(2, 16, 5, 3)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # [B, C, N]
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(16), dim=-1)  # [B, N, N]
    ref = x + block.proj_out((v @ w.transpose(1, 2)).view_as(x))
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cin", [8, 16])
def test_resnet_block_matches_formula(cin):
    torch.manual_seed(0)
    block = ResnetBlock(cin, 16, num_groups=8)
    x = torch.randn(2, cin, 6, 6)
    h = block.conv1(F.silu(block.norm1(x)))
    h = block.conv2(F.silu(block.norm2(h)))
    skip = block.nin_shortcut(x) if cin != 16 else x
    torch.testing.assert_close(block(x), skip + h)
    assert hasattr(block, "nin_shortcut") == (cin != 16)


def test_gradients_flow_through_in_place_activations():
    torch.manual_seed(0)
    enc = Encoder(in_channels=3, **arch())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    enc(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())


def test_channels_last_gives_the_same_result():
    torch.manual_seed(0)
    kw = arch()
    enc, dec = Encoder(in_channels=3, **kw), Decoder(out_channels=3, **kw)
    x = torch.randn(2, 3, 16, 16)
    ref = dec(enc(x))
    enc.to(memory_format=torch.channels_last)
    dec.to(memory_format=torch.channels_last)
    out = dec(enc(x.contiguous(memory_format=torch.channels_last)))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# -- discriminator ---------------------------------------------------------------------------------
def test_patchgan_layout_and_output_shape():
    disc = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=3)
    convs = [i for i, m in enumerate(disc.main) if isinstance(m, nn.Conv2d)]
    norms = [i for i, m in enumerate(disc.main) if isinstance(m, nn.BatchNorm2d)]
    assert convs == [0, 2, 5, 8, 11] and norms == [3, 6, 9]
    # BatchNorm follows: those convs carry no bias; the first and last do.
    assert [disc.main[i].bias is not None for i in convs] == [True, False, False, False, True]
    assert [disc.main[i].out_channels for i in convs] == [8, 16, 32, 64, 1]
    # 64 -> 32 -> 16 -> 8 (stride 2), then two stride-1 k4 p1 convs: 7, 6.
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_patchgan_weights_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=64, n_layers=3)
    w = disc.main[5].weight.detach()  # 128 -> 256, 4x4: many samples
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    bn = disc.main[3].requires_grad_(False)
    assert abs(float(bn.weight.mean()) - 1.0) < 0.01 and float(bn.bias.abs().max()) == 0.0


def test_actnorm_initialises_from_first_training_batch():
    norm = ActNorm(4).train()
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    assert int(norm.initialized) == 1
    loc = norm.loc.detach().clone()
    norm(torch.randn(8, 4, 5, 5))
    torch.testing.assert_close(norm.loc.detach(), loc)  # later batches do not re-initialise
    assert {k for k in NLayerDiscriminator(norm="actnorm").state_dict() if ".3." in k} == {
        "main.3.loc",
        "main.3.scale",
        "main.3.initialized",
    }


# -- losses ----------------------------------------------------------------------------------------
def test_adaptive_weight_matches_manual_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    disc = nn.Conv2d(3, 1, 3)
    x = torch.randn(2, 3, 8, 8)
    recon = net(x)
    rec = (recon - x).abs().mean()
    gen = -disc(recon).mean()
    last = net[2].weight
    lam = adaptive_weight(rec, gen, last)

    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gen, last, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(lam, expected)
    assert not lam.requires_grad
    # The graph is kept: the caller can still backpropagate the total.
    (rec + lam * gen).backward()
    assert last.grad is not None
    # Clamped at max.
    assert float(adaptive_weight(net(x).mean() * 1e9, -disc(net(x)).mean(), last, max=5.0)) == 5.0


def test_gan_weight_ramp():
    assert gan_weight_ramp(99, disc_start=100, warmup=10) == 0.0
    assert gan_weight_ramp(100, disc_start=100, warmup=10) == pytest.approx(0.1)
    assert gan_weight_ramp(104, disc_start=100, warmup=10) == pytest.approx(0.5)
    assert gan_weight_ramp(109, disc_start=100, warmup=10) == 1.0
    assert gan_weight_ramp(10_000, disc_start=100, warmup=10) == 1.0
    assert gan_weight_ramp(100, disc_start=100, warmup=0) == 1.0  # abrupt, as the reference
    ramp = [gan_weight_ramp(s, 5, 4) for s in range(12)]
    assert ramp == sorted(ramp)  # monotone
    with pytest.raises(SpecError):
        gan_weight_ramp(0, 0, -1)


def test_gan_losses():
    good_real, good_fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert float(d_loss("hinge", good_real, good_fake)) == 0.0  # beyond the margins
    assert float(d_loss("hinge", -good_real, -good_fake)) == pytest.approx(3.0)
    zeros = torch.zeros(4)
    assert float(d_loss("vanilla", zeros, zeros)) == pytest.approx(math.log(2))
    assert float(d_loss("vanilla", good_real, good_fake)) < float(d_loss("vanilla", zeros, zeros))
    assert float(g_loss("hinge", good_fake)) == 2.0
    assert float(g_loss("vanilla", good_real)) < float(g_loss("vanilla", good_fake))
    with pytest.raises(SpecError, match="hinge"):
        d_loss("wasserstein", zeros, zeros)  # type: ignore[arg-type]


def test_reconstruction_loss():
    x, y = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]])
    assert float(reconstruction_loss(x, y, "l1")) == 1.0
    assert float(reconstruction_loss(x, y, "l2")) == 1.5


@pytest.mark.parametrize("size", [(5, 7), (8, 8)])
def test_upsample_equals_nearest_upsampling_then_conv(size):
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(2, 6, *size, requires_grad=True)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = up(x)
    assert out.shape == (2, 6, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Same gradients for the input and the conv weights.
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, up.conv.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, up.conv.weight), g)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-4)
    assert set(up.state_dict()) == {"conv.weight", "conv.bias"}
