"""Importing taming-transformers checkpoints: key layout, numerics, and safe reading of .ckpt files.

The reference here is written from the taming layout rules (``Encoder``/``Decoder`` of
``taming/modules/diffusionmodules/model.py``, ``NLayerDiscriminator``, ``VectorQuantizer2``,
``GumbelQuantize``) as plain functional code over a dict of tensors in *their* key names, so a
converted model must reproduce it from the raw weights.
"""

from __future__ import annotations

import math
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from latentgen.errors import CheckpointError
from latentgen.tokenizers.taming import convert_taming_vqgan, read_lightning_checkpoint
from latentgen.tokenizers.vqgan import VQGAN, VQGANConfig

# A small taming-style model: GroupNorm with 32 groups needs >= 32 channels.
ARCH = dict(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=8
)
N_EMBED, EMBED_DIM = 16, 4


# -- the reference layout -------------------------------------------------------------------------
def _resblock(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        f"{prefix}.norm1.weight": (cin,),
        f"{prefix}.norm1.bias": (cin,),
        f"{prefix}.conv1.weight": (cout, cin, 3, 3),
        f"{prefix}.conv1.bias": (cout,),
        f"{prefix}.norm2.weight": (cout,),
        f"{prefix}.norm2.bias": (cout,),
        f"{prefix}.conv2.weight": (cout, cout, 3, 3),
        f"{prefix}.conv2.bias": (cout,),
    }
    if cin != cout:
        shapes[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1, 1)
        shapes[f"{prefix}.nin_shortcut.bias"] = (cout,)
    return shapes


def _attn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
    for m in ("q", "k", "v", "proj_out"):
        shapes[f"{prefix}.{m}.weight"] = (c, c, 1, 1)
        shapes[f"{prefix}.{m}.bias"] = (c,)
    return shapes


def _conv(name: str, cout: int, cin: int, k: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def taming_layout(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                  in_channels=3) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Names and shapes of taming's Encoder + Decoder state dict (as `encoder.` / `decoder.`)."""
    out: dict[str, tuple[int, ...]] = {}
    n = len(ch_mult)
    mults = (1, *ch_mult)
    e = "encoder"
    out.update(_conv(f"{e}.conv_in", ch, in_channels, 3))
    res = resolution
    for i in range(n):
        cin, cout = ch * mults[i], ch * ch_mult[i]
        for j in range(num_res_blocks):
            out.update(_resblock(f"{e}.down.{i}.block.{j}", cin, cout))
            cin = cout
            if res in attn_resolutions:
                out.update(_attn(f"{e}.down.{i}.attn.{j}", cout))
        if i != n - 1:
            out.update(_conv(f"{e}.down.{i}.downsample.conv", cout, cout, 3))
            res //= 2
    c = ch * ch_mult[-1]
    for side in ("encoder", "decoder"):
        out.update(_resblock(f"{side}.mid.block_1", c, c))
        out.update(_attn(f"{side}.mid.attn_1", c))
        out.update(_resblock(f"{side}.mid.block_2", c, c))
    out[f"{e}.norm_out.weight"] = out[f"{e}.norm_out.bias"] = (c,)
    out.update(_conv(f"{e}.conv_out", z_channels, c, 3))

    d = "decoder"
    out.update(_conv(f"{d}.conv_in", c, z_channels, 3))
    res = resolution // 2 ** (n - 1)
    cin = c
    for i in reversed(range(n)):
        cout = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            out.update(_resblock(f"{d}.up.{i}.block.{j}", cin, cout))
            cin = cout
            if res in attn_resolutions:
                out.update(_attn(f"{d}.up.{i}.attn.{j}", cout))
        if i != 0:
            out.update(_conv(f"{d}.up.{i}.upsample.conv", cout, cout, 3))
            res *= 2
    out[f"{d}.norm_out.weight"] = out[f"{d}.norm_out.bias"] = (cin,)
    out.update(_conv(f"{d}.conv_out", in_channels, cin, 3))
    return out


def disc_layout(in_channels=3, ndf=8, n_layers=2) -> dict[str, tuple[int, ...]]:
    """pix2pix NLayerDiscriminator with BatchNorm, under taming's `loss.discriminator.main.`."""
    p = "loss.discriminator.main"
    out = _conv(f"{p}.0", ndf, in_channels, 4)
    mult, idx = 1, 2
    for layer in range(1, n_layers + 1):
        prev, mult = mult, min(2**layer, 8)
        out[f"{p}.{idx}.weight"] = (ndf * mult, ndf * prev, 4, 4)
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"{p}.{idx + 1}.{name}"] = (ndf * mult,)
        out[f"{p}.{idx + 1}.num_batches_tracked"] = ()
        idx += 3
    out.update(_conv(f"{p}.{idx}", 1, ndf * mult, 4))
    return out


def fake_taming_state_dict(gumbel: bool = False, seed: int = 0) -> dict[str, Tensor]:
    """Random weights in the taming key layout, including LPIPS entries that must be dropped."""
    g = torch.Generator().manual_seed(seed)
    shapes = taming_layout(**ARCH)
    shapes.update(_conv("quant_conv", EMBED_DIM, ARCH["z_channels"], 1))
    shapes.update(_conv("post_quant_conv", ARCH["z_channels"], EMBED_DIM, 1))
    if gumbel:
        shapes.update(_conv("quantize.proj", N_EMBED, EMBED_DIM, 1))
        shapes["quantize.embed.weight"] = (N_EMBED, EMBED_DIM)
    else:
        shapes["quantize.embedding.weight"] = (N_EMBED, EMBED_DIM)
    shapes.update(disc_layout())
    shapes["loss.perceptual_loss.net.slice1.0.weight"] = (64, 3, 3, 3)
    shapes["loss.perceptual_loss.lin0.model.1.weight"] = (1, 64, 1, 1)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var") or ("norm" in k and k.endswith("weight")):
            sd[k] = 1.0 + 0.1 * torch.rand(shape, generator=g)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


# -- the reference forward, from their key names --------------------------------------------------
def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv2d(sd, p, x, **kw):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)


def _ref_res(sd, p, x):
    h = _conv2d(sd, f"{p}.conv1", F.silu(_gn(sd, f"{p}.norm1", x)), padding=1)
    h = _conv2d(sd, f"{p}.conv2", F.silu(_gn(sd, f"{p}.norm2", h)), padding=1)
    if f"{p}.nin_shortcut.weight" in sd:
        x = _conv2d(sd, f"{p}.nin_shortcut", x)
    return x + h


def _ref_attn(sd, p, x):
    b, c, hh, ww = x.shape
    h = _gn(sd, f"{p}.norm", x)
    q, k, v = (_conv2d(sd, f"{p}.{m}", h).reshape(b, c, hh * ww) for m in "qkv")
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c**-0.5, dim=2)  # [B, N(q), N(k)]
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv2d(sd, f"{p}.proj_out", out)


def _ref_level(sd, p, h, blocks):
    for j in range(blocks):
        h = _ref_res(sd, f"{p}.block.{j}", h)
        if f"{p}.attn.{j}.q.weight" in sd:
            h = _ref_attn(sd, f"{p}.attn.{j}", h)
    return h


def _ref_mid(sd, p, h):
    return _ref_res(
        sd, f"{p}.block_2", _ref_attn(sd, f"{p}.attn_1", _ref_res(sd, f"{p}.block_1", h))
    )


def ref_encode_latents(sd, x):
    n = len(ARCH["ch_mult"])
    h = _conv2d(sd, "encoder.conv_in", x, padding=1)
    for i in range(n):
        h = _ref_level(sd, f"encoder.down.{i}", h, ARCH["num_res_blocks"])
        if i != n - 1:
            h = _conv2d(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = _ref_mid(sd, "encoder.mid", h)
    h = _conv2d(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h)), padding=1)
    return _conv2d(sd, "quant_conv", h)


def ref_decode(sd, zq):
    n = len(ARCH["ch_mult"])
    h = _conv2d(sd, "decoder.conv_in", _conv2d(sd, "post_quant_conv", zq), padding=1)
    h = _ref_mid(sd, "decoder.mid", h)
    for i in reversed(range(n)):
        h = _ref_level(sd, f"decoder.up.{i}", h, ARCH["num_res_blocks"] + 1)
        if i != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = _conv2d(sd, f"decoder.up.{i}.upsample.conv", h, padding=1)
    return _conv2d(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h)), padding=1)


def ref_vq(sd, z):
    """VectorQuantizer2 in eval: nearest code by squared distance; returns (codes, z_q)."""
    e = sd["quantize.embedding.weight"]
    zf = z.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
    d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
    idx = d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])
    return idx, e[idx].permute(0, 3, 1, 2)


def images(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 16, 16, generator=g) * 2 - 1


MODEL_YAML = {
    "model": {
        "base_learning_rate": 4.5e-6,
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": EMBED_DIM,
            "n_embed": N_EMBED,
            "ddconfig": {
                "double_z": False,
                "z_channels": ARCH["z_channels"],
                "resolution": ARCH["resolution"],
                "in_channels": 3,
                "out_ch": 3,
                "ch": ARCH["ch"],
                "ch_mult": list(ARCH["ch_mult"]),
                "num_res_blocks": ARCH["num_res_blocks"],
                "attn_resolutions": list(ARCH["attn_resolutions"]),
                "dropout": 0.0,
            },
            "lossconfig": {
                "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                "params": {
                    "disc_conditional": False,
                    "disc_in_channels": 3,
                    "disc_start": 250001,
                    "disc_weight": 0.8,
                    "codebook_weight": 1.0,
                },
            },
        },
    }
}


# -- conversion ------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_yaml", [False, True])
def test_converted_vqgan_reproduces_the_reference(with_yaml):
    sd = fake_taming_state_dict()
    cfg, tensors = convert_taming_vqgan(sd, MODEL_YAML if with_yaml else None)
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == (32, (1, 2), 1, 8)
    assert cfg.quantizer.type == "vq" and (cfg.quantizer.codebook_size, cfg.quantizer.dim) == (
        N_EMBED,
        EMBED_DIM,
    )
    assert cfg.attn_resolutions == ((8,) if with_yaml else (128,))  # nominal 256 when inferred
    if with_yaml:
        assert (cfg.disc_start, cfg.disc_weight, cfg.disc_warmup_steps) == (250001, 0.8, 0)

    tok = VQGAN(cfg)
    tok.load_state_dict(tensors, strict=True)
    tok.eval()
    x = images()
    with torch.no_grad():
        # Encoder features from our modules equal the reference run on their names.
        z = tok.quant_conv(tok.encoder(x))
        ref_z = ref_encode_latents(sd, x)
        torch.testing.assert_close(z, ref_z, atol=1e-5, rtol=1e-5)
        ref_codes, ref_zq = ref_vq(sd, ref_z)
        codes = tok.encode(x)
        assert torch.equal(codes, ref_codes)
        torch.testing.assert_close(tok.decode(codes), ref_decode(sd, ref_zq), atol=1e-5, rtol=1e-5)
        # The discriminator came along: same logits as pix2pix's layer stack on their weights.
        torch.testing.assert_close(tok.discriminator(x), _ref_disc(sd, x), atol=1e-5, rtol=1e-5)
    assert not any("perceptual" in k for k in tensors)
    assert int(tensors["quantizer.codebook_initialized"]) == 1


def _ref_disc(sd, x):
    p = "loss.discriminator.main"
    h = F.leaky_relu(_conv2d(sd, f"{p}.0", x, stride=2, padding=1), 0.2)
    idx, n_layers = 2, 2
    for layer in range(1, n_layers + 1):
        stride = 2 if layer < n_layers else 1
        h = F.conv2d(h, sd[f"{p}.{idx}.weight"], None, stride=stride, padding=1)
        bn = f"{p}.{idx + 1}"
        h = F.batch_norm(
            h, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"],
            sd[f"{bn}.bias"], training=False,
        )  # fmt: skip
        h = F.leaky_relu(h, 0.2)
        idx += 3
    return _conv2d(sd, f"{p}.{idx}", h, padding=1)


def test_converted_gumbel_model_uses_argmax_codes():
    # Their Gumbel release was trained with DummyLoss: no discriminator in the checkpoint.
    sd = {k: v for k, v in fake_taming_state_dict(gumbel=True).items() if "discriminator" not in k}
    yaml_gumbel = {
        "target": "taming.models.vqgan.GumbelVQ",
        "params": {
            **MODEL_YAML["model"]["params"],
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
            "kl_weight": 1e-8,
            "temperature_scheduler_config": {
                "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9,
                           "lr_max": 0.9, "lr_min": 1.0e-06},
            },
        },
    }  # fmt: skip
    cfg, tensors = convert_taming_vqgan(sd, yaml_gumbel)
    q = cfg.quantizer
    assert q.type == "gumbel" and (q.codebook_size, q.dim, q.kl_weight) == (16, 4, 1e-8)
    assert (q.tau_start, q.tau_end, q.anneal_steps) == (0.9, 1e-6, 1000001)
    # A fresh discriminator keeps our delayed, ramped start.
    assert (cfg.disc_start, cfg.disc_warmup_steps) == (VQGANConfig().disc_start, 1000)
    tok = VQGAN(cfg)
    tok.load_state_dict(tensors, strict=True)
    tok.eval()
    x = images()
    with torch.no_grad():
        logits = _conv2d(sd, "quantize.proj", ref_encode_latents(sd, x))  # [B, K, h, w]
        ref_codes = logits.argmax(1)
        assert torch.equal(tok.encode(x), ref_codes)
        ref_zq = sd["quantize.embed.weight"][ref_codes].permute(0, 3, 1, 2)
        torch.testing.assert_close(
            tok.decode(ref_codes), ref_decode(sd, ref_zq), atol=1e-5, rtol=1e-5
        )


def test_every_mismatch_is_listed_at_once():
    sd = fake_taming_state_dict()
    del sd["decoder.mid.attn_1.q.bias"]
    sd["post_quant_conv.weight"] = torch.zeros(8, 5, 1, 1)
    sd["quantize.extra_thing"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        convert_taming_vqgan(sd)
    msg = str(err.value)
    assert "decoder.mid.attn_1.q.bias" in msg
    assert "post_quant_conv.weight: checkpoint (8, 5, 1, 1) vs model (8, 4, 1, 1)" in msg
    assert "quantize.extra_thing" in msg


def test_missing_discriminator_needs_explicit_consent():
    sd = {k: v for k, v in fake_taming_state_dict().items() if not k.startswith("loss.")}
    with pytest.raises(CheckpointError, match="init_missing_discriminator"):
        convert_taming_vqgan(sd)
    cfg, tensors = convert_taming_vqgan(sd, init_missing_discriminator=True)
    VQGAN(cfg).load_state_dict(tensors, strict=True)


def test_kl_autoencoder_is_refused():
    sd = fake_taming_state_dict()
    sd["encoder.conv_out.weight"] = torch.zeros(16, 64, 3, 3)
    with pytest.raises(CheckpointError, match="KL autoencoder"):
        convert_taming_vqgan(sd)


# -- published architectures ----------------------------------------------------------------------
PUBLISHED = {
    # vqgan_imagenet_f16_1024 / _16384: identical networks, codebooks of 1024 / 16384.
    "imagenet_f16_1024": (dict(ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,)), "vq", 1024),
    "imagenet_f16_16384": (dict(ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,)), "vq", 16384),
    "gumbel_f8": (dict(ch_mult=(1, 1, 2, 4), attn_resolutions=(32,)), "gumbel", 8192),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_architectures_have_the_reference_layout(name):
    net, qtype, k = PUBLISHED[name]
    common = dict(ch=128, num_res_blocks=2, z_channels=256, resolution=256)
    cfg = VQGANConfig(**common, **net, quantizer={"type": qtype, "codebook_size": k, "dim": 256})
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VQGAN(cfg).state_dict().items()}
    theirs = taming_layout(**common, **net)
    nets = {k: v for k, v in ours.items() if k.startswith(("encoder.", "decoder."))}
    assert nets == theirs
    assert ours["quant_conv.weight"] == (256, 256, 1, 1)
    if qtype == "vq":
        assert ours["quantizer.codebook"] == (k, 256)
    else:
        assert ours["quantizer.to_logits.weight"] == (k, 256, 1, 1)
        assert ours["quantizer.codebook.weight"] == (k, 256)
    disc = {"discriminator." + k[len("loss.discriminator.") :]: v for k, v in
            disc_layout(ndf=64, n_layers=3).items()}  # fmt: skip
    assert {k: v for k, v in ours.items() if k.startswith("discriminator.")} == disc
    assert cfg.downsample == (16 if "f16" in name else 8)


# -- reading Lightning checkpoints without running them -------------------------------------------
CALLS: list[str] = []


@pytest.fixture
def fake_lightning(monkeypatch):
    """A fake `pytorch_lightning` whose pickled objects call `_record` when unpickled."""
    pl = types.ModuleType("pytorch_lightning")
    cb = types.ModuleType("pytorch_lightning.callbacks")

    def _record(tag):
        CALLS.append(tag)
        return tag

    _record.__module__ = "pytorch_lightning.callbacks"
    _record.__qualname__ = "_record"

    class ModelCheckpoint:
        def __reduce__(self):
            return (_record, ("ModelCheckpoint executed",))

    class AttributeDict(dict):
        pass

    for obj in (ModelCheckpoint, AttributeDict):
        obj.__module__ = "pytorch_lightning.callbacks"
        obj.__qualname__ = obj.__name__
    cb._record = _record
    cb.ModelCheckpoint = ModelCheckpoint
    cb.AttributeDict = AttributeDict
    pl.callbacks = cb
    monkeypatch.setitem(sys.modules, "pytorch_lightning", pl)
    monkeypatch.setitem(sys.modules, "pytorch_lightning.callbacks", cb)
    CALLS.clear()
    return cb


def test_reads_lightning_checkpoint_without_executing_it(tmp_path, fake_lightning):
    sd = fake_taming_state_dict()
    hparams = fake_lightning.AttributeDict(lr=4.5e-6, ddconfig={"ch": 32})
    ckpt = {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.0.8",
        "callbacks": {fake_lightning.ModelCheckpoint: fake_lightning.ModelCheckpoint()},
        "hyper_parameters": hparams,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.5, 0.9)}]}],
        "state_dict": sd,
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    # The plain weights-only load refuses this file: the fallback path is what is tested.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    got = read_lightning_checkpoint(path)
    assert CALLS == []  # nothing from the pickle ran, though the module was importable
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)

    # And an ordinary unpickler *would* have run it: the test can fail.
    torch.load(path, weights_only=False)
    assert CALLS == ["ModelCheckpoint executed"]


def test_reads_bare_state_dict_files(tmp_path):
    sd = {"a": torch.arange(3.0), "b.c": torch.ones(2, 2)}
    torch.save(sd, tmp_path / "sd.pt")
    got = read_lightning_checkpoint(tmp_path / "sd.pt")
    assert set(got) == {"a", "b.c"} and torch.equal(got["b.c"], sd["b.c"])


def test_unreadable_checkpoints_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_lightning_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        read_lightning_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"epoch": 1, "global_step": 5}, tmp_path / "nosd.ckpt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        read_lightning_checkpoint(tmp_path / "nosd.ckpt")
