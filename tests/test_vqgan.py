"""The vqvae and vqgan tokenizers: contract, training protocol, losses, config checks."""

from __future__ import annotations

import copy

import pydantic
import pytest
import torch

from latentgen import registry
from latentgen.errors import InputError, UnknownComponentError, WeightsNotFoundError
from latentgen.tokenizers.vqgan import VQGAN, VQGANConfig
from latentgen.tokenizers.vqvae import VQVAE, VQVAEConfig

TINY = dict(
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    z_channels=8,
    resolution=16,
    norm_groups=8,
    quantizer={"type": "vq", "codebook_size": 32, "dim": 4},
)
GAN = dict(perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2)


def tiny(kind: str = "vqvae", **kw):
    torch.manual_seed(0)
    return registry.build(
        "tokenizer", {"type": kind, **TINY, **(GAN if kind == "vqgan" else {}), **kw}
    )


def images(b: int = 2, c: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g) * 2 - 1


# -- contract --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "ch_mult", "in_channels", "quantizer", "k"),
    [
        ("vqvae", (1, 2), 3, {"type": "vq", "codebook_size": 32, "dim": 4}, 32),
        ("vqvae", (1, 1, 2), 7, {"type": "ema", "codebook_size": 32, "dim": 4}, 32),
        ("vqvae", (1, 2), 1, {"type": "fsq", "levels": [4, 3, 2]}, 24),
        ("vqgan", (1, 2, 2), 3, {"type": "vq", "codebook_size": 32, "dim": 4}, 32),
        ("vqgan", (1, 2), 7, {"type": "gumbel", "codebook_size": 32, "dim": 4}, 32),
    ],
)
def test_shapes_and_downsample(kind, ch_mult, in_channels, quantizer, k):
    f = 2 ** (len(ch_mult) - 1)
    tok = tiny(
        kind, ch_mult=ch_mult, in_channels=in_channels, attn_resolutions=(), quantizer=quantizer
    )
    assert isinstance(tok, VQGAN if kind == "vqgan" else VQVAE)
    assert (tok.downsample, tok.vocab_size, tok.in_channels) == (f, k, in_channels)
    x = images(c=in_channels, size=16)
    out = tok(x)
    assert out.recon.shape == x.shape and out.codes.shape == (2, 16 // f, 16 // f)
    assert out.quant_loss.dim() == 0
    tok.eval()
    codes = tok.encode(x)
    assert codes.shape == (2, 16 // f, 16 // f) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < k
    assert tok.decode(codes).shape == x.shape


@pytest.mark.parametrize("kind", ["vqvae", "vqgan"])
def test_forward_recon_is_decode_of_its_codes_in_eval(kind):
    tok = tiny(kind).eval()
    x = images()
    with torch.no_grad():
        out = tok(x)
        torch.testing.assert_close(tok.encode(x), out.codes)
        torch.testing.assert_close(tok.decode(out.codes), out.recon, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_encoder_through_quantizer():
    tok = tiny("vqvae")
    out = tok(images())
    (out.recon - images()).abs().mean().backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "decoder.conv_out.weight"):
        grad = tok.get_parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_bad_inputs_name_the_fix():
    tok = tiny("vqvae")
    with pytest.raises(InputError, match="multiples of its downsample factor 2"):
        tok.encode(images(size=15))
    with pytest.raises(InputError, match="takes 3-channel images, got 1"):
        tok(images(c=1))
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        tok.encode(images() * 5)
    with pytest.raises(InputError, match=r"\[0, 32\)"):
        tok.decode(torch.full((1, 8, 8), 32))


def test_config_validation():
    with pytest.raises(pydantic.ValidationError, match="attn_resolutions"):
        VQVAEConfig(**{**TINY, "attn_resolutions": (5,)})
    with pytest.raises(pydantic.ValidationError, match="multiple of the downsample factor"):
        VQVAEConfig(**{**TINY, "resolution": 17})
    with pytest.raises(pydantic.ValidationError, match="perceptual_weight"):
        VQGANConfig(**TINY, in_channels=7, perceptual_weight=1.0)
    with pytest.raises(pydantic.ValidationError, match="disc_in_channels"):
        VQGANConfig(**TINY, disc_in_channels=4)
    with pytest.raises(pydantic.ValidationError):
        VQGANConfig(**TINY, disc_loss="wgan")
    with pytest.raises(pydantic.ValidationError):
        VQVAEConfig(**TINY, perceptual_weight=1.0)  # a vqgan field on a vqvae: refused
    cfg = VQGANConfig(**TINY, **GAN)
    assert VQGANConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert cfg.downsample == 2


def test_channels_last_option_gives_same_outputs():
    x = images()
    a = tiny("vqvae").eval()
    b = tiny("vqvae", channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(b(x).recon, a(x).recon, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.encode(x), a.encode(x))


# -- training protocol ----------------------------------------------------------------------------
def test_vqvae_protocol():
    tok = tiny("vqvae")
    assert tok.has_discriminator is False
    assert list(tok.discriminator_parameters()) == []
    assert len(list(tok.generator_parameters())) == len(list(tok.parameters()))
    loss, logs, out = tok.generator_loss(images(), step=0)
    assert loss.requires_grad and {"rec_loss", "quant_loss", "total_loss"} <= set(logs)
    torch.testing.assert_close(loss, torch.tensor(logs["rec_loss"] + logs["quant_loss"]))
    with pytest.raises(NotImplementedError, match="has_discriminator"):
        tok.discriminator_loss(images(), out.recon, step=0)


def test_vqgan_parameters_split_into_generator_and_discriminator():
    tok = tiny("vqgan")
    gen = {id(p) for p in tok.generator_parameters()}
    disc = {id(p) for p in tok.discriminator_parameters()}
    assert gen and disc and not gen & disc
    assert gen | disc == {id(p) for p in tok.parameters()}
    assert disc == {id(p) for p in tok.discriminator.parameters()}


def test_vqgan_alternating_steps():
    tok = tiny("vqgan", disc_start=2, disc_warmup_steps=2)
    opt_g = torch.optim.Adam(tok.generator_parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(tok.discriminator_parameters(), lr=1e-3)
    x = images(b=4)
    disc_before = [p.detach().clone() for p in tok.discriminator_parameters()]
    for step in range(5):
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        loss, logs, out = tok.generator_loss(x, step)
        loss.backward()
        # The generator's backward leaves the discriminator untouched.
        assert all(p.grad is None for p in tok.discriminator_parameters())
        opt_g.step()

        d, d_logs = tok.discriminator_loss(x, out.recon, step)
        d.backward()
        opt_d.step()

        assert torch.isfinite(loss) and torch.isfinite(d)
        expected_ramp = [0.0, 0.0, 0.5, 1.0, 1.0][step]
        assert logs["gan_weight"] == d_logs["gan_weight"] == expected_ramp
        if step < 2:
            # Before disc_start neither loss runs the discriminator.
            assert "g_loss" not in logs and float(d.detach()) == 0.0
            assert all(
                torch.equal(a, b)
                for a, b in zip(disc_before, tok.discriminator_parameters(), strict=True)
            )
        else:
            assert logs["d_weight"] > 0 and "logits_real" in d_logs
    assert any(
        not torch.equal(a, b)
        for a, b in zip(disc_before, tok.discriminator_parameters(), strict=True)
    )


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_vqgan_total_is_sum_of_logged_terms(disc_loss):
    tok = tiny("vqgan", disc_start=0, disc_warmup_steps=0, disc_loss=disc_loss, codebook_weight=2)
    loss, logs, _ = tok.generator_loss(images(), step=10)
    expected = logs["rec_loss"] + 2 * logs["quant_loss"] + logs["d_weight"] * logs["g_loss"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert logs["total_loss"] == pytest.approx(float(loss.detach()))


def test_vqgan_generator_loss_without_grad_skips_adaptive_weight():
    tok = tiny("vqgan", disc_start=0, disc_warmup_steps=0).eval()
    with torch.no_grad():
        loss, logs, _ = tok.generator_loss(images(), step=5)
    assert logs["d_weight"] == 0.0 and "g_loss" in logs
    assert float(loss.detach()) == pytest.approx(logs["rec_loss"] + logs["quant_loss"], rel=1e-5)


def test_missing_lpips_weights_propagate(tmp_path):
    missing = tmp_path / "no_vgg.safetensors"
    tok = tiny("vqgan", perceptual_weight=1.0, lpips_trunk_path=str(missing))
    with pytest.raises(WeightsNotFoundError, match=r"no_vgg\.safetensors"):
        tok.generator_loss(images(), step=0)


def test_perceptual_loss_enters_when_weights_exist():
    from latentgen.metrics.lpips import lpips_available

    if not lpips_available():
        pytest.skip("LPIPS weights are not on this machine")
    tok = tiny("vqgan", perceptual_weight=1.0, disc_start=100)
    loss, logs, _ = tok.generator_loss(images(), step=0)
    assert logs["p_loss"] > 0
    assert float(loss.detach()) == pytest.approx(
        logs["rec_loss"] + logs["p_loss"] + logs["quant_loss"]
    )
    # LPIPS is not part of the tokenizer: its weights stay out of checkpoints.
    assert not any("lpips" in k or "trunk" in k for k in tok.state_dict())


def test_tiny_vqvae_overfits_four_images():
    torch.manual_seed(0)
    # Cosine codes keep the codebook in use from the start (about 10x drop; plain codes ~5x).
    tok = tiny(
        "vqvae", quantizer={"type": "vq", "codebook_size": 64, "dim": 4, "l2_normalize": True}
    )
    # Smooth images (upsampled 4x4 noise), so that 8x8 codes can describe them.
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=16) * 1.8 - 0.9
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    first = None
    for step in range(100):
        opt.zero_grad()
        loss, logs, _ = tok.generator_loss(x, step)
        loss.backward()
        opt.step()
        first = logs["rec_loss"] if first is None else first
    tok.eval()
    with torch.no_grad():
        final = float((tok.decode(tok.encode(x)) - x).abs().mean())
    print(f"overfit: L1 {first:.4f} -> {final:.4f}")
    assert final < first / 5, (first, final)


def test_state_dict_round_trip_rebuilds_the_same_tokenizer(tmp_path):
    from latentgen.artifact import load_module
    from latentgen.files import load_tensors, save_tensors

    tok = tiny("vqgan").eval()
    save_tensors(tmp_path / "w.safetensors", tok.state_dict())
    again = VQGAN(VQGANConfig.model_validate_json(tok.config.model_dump_json())).eval()
    load_module(again, load_tensors(tmp_path / "w.safetensors"), "tokenizer")
    x = images()
    torch.testing.assert_close(again.encode(x), tok.encode(x))
    with torch.no_grad():
        torch.testing.assert_close(again(x).recon, tok(x).recon)


def test_vqgan_and_vqvae_share_their_weights_layout():
    a, b = tiny("vqvae"), tiny("vqgan")
    shared = {k for k in b.state_dict() if not k.startswith("discriminator.")}
    assert set(a.state_dict()) == shared


def test_unknown_quantizer_type_is_named():
    with pytest.raises(UnknownComponentError, match="unknown quantizer type 'nope'"):
        VQVAEConfig(**{**TINY, "quantizer": {"type": "nope"}})


@pytest.mark.parametrize("perceptual", [0.0, 1.0])
def test_vqgan_generator_gradients_equal_the_direct_formula(perceptual):
    """The single-pass GAN/LPIPS gradient gives what differentiating the loss directly gives."""
    from latentgen.metrics.lpips import lpips_available
    from latentgen.tokenizers.losses import adaptive_weight, g_loss, reconstruction_loss

    if perceptual and not lpips_available():
        pytest.skip("LPIPS weights are not on this machine")
    tok = tiny("vqgan", disc_start=0, disc_warmup_steps=4, perceptual_weight=perceptual)
    ref = copy.deepcopy(tok)
    x = images()
    loss, logs, _ = tok.generator_loss(x, step=1)  # ramp 0.5
    loss.backward()

    out = ref(x)
    nll = reconstruction_loss(x, out.recon, "l1")
    if perceptual:
        nll = nll + perceptual * ref._perceptual(x, out.recon)
    ref.discriminator.requires_grad_(False)
    gen = g_loss("hinge", ref.discriminator(out.recon))
    lam = adaptive_weight(nll, gen, ref.decoder.conv_out.weight) * ref.config.disc_weight
    total = nll + lam * 0.5 * gen + out.quant_loss
    total.backward()

    assert logs["d_weight"] == pytest.approx(float(lam), rel=1e-4)
    assert float(loss.detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    for (name, p), q in zip(tok.named_parameters(), ref.parameters(), strict=True):
        if name.startswith("discriminator."):
            assert p.grad is None
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
