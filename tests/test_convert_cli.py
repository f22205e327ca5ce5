"""`latentgen convert`: taming checkpoints (Lightning pickles) -> latentgen directories."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from latentgen import Pipeline
from latentgen.artifact import load_component
from latentgen.cli import main
from test_taming_convert import N_EMBED, fake_taming_state_dict, images, ref_encode_latents, ref_vq

GRID = 8  # ARCH: resolution 16, f = 2
C, HEADS = 16, 2


def _gpt(vocab: int, block: int, n_layer: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in their minGPT key layout, under ``transformer.``."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(shape, generator=g) / math.sqrt(shape[-1])

    sd = {
        "tok_emb.weight": w(vocab, C),
        "pos_emb": 0.02 * torch.randn(1, block, C, generator=g),
        "ln_f.weight": torch.ones(C),
        "ln_f.bias": torch.zeros(C),
        "head.weight": w(vocab, C),
    }
    for i in range(n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = torch.ones(C), torch.zeros(C)
        for lin in ("key", "query", "value", "proj"):
            sd[p + f"attn.{lin}.weight"], sd[p + f"attn.{lin}.bias"] = w(C, C), torch.zeros(C)
        sd[p + "attn.mask"] = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
        sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = w(4 * C, C), torch.zeros(4 * C)
        sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = w(C, 4 * C), torch.zeros(C)
    return {f"transformer.{k}": v for k, v in sd.items()}


def _save_ckpt(path, state_dict):
    torch.save({"state_dict": state_dict, "epoch": 3, "global_step": 1000}, path)
    return path


def test_convert_taming_vqgan(tmp_path):
    sd = fake_taming_state_dict()
    ckpt = _save_ckpt(tmp_path / "last.ckpt", sd)
    res = CliRunner().invoke(main, ["convert", "taming-vqgan", str(ckpt), str(tmp_path / "tok")])
    assert res.exit_code == 0, res.output
    tok = load_component(tmp_path / "tok", "tokenizer").eval()
    x = images()
    want, _ = ref_vq(sd, ref_encode_latents(sd, x))
    assert torch.equal(tok.encode(x), want)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_convert_taming_transformer_to_pipeline(tmp_path, num_classes):
    first = {f"first_stage_model.{k}": v for k, v in fake_taming_state_dict().items()}
    gpt = _gpt(N_EMBED, GRID * GRID)
    ckpt = _save_ckpt(tmp_path / "net2net.ckpt", {**first, **gpt})
    args = [
        "convert",
        "taming-transformer",
        str(ckpt),
        str(tmp_path / "pipe"),
        "--n-head",
        str(HEADS),
        "--image-size",
        "16",
    ]
    if num_classes:
        args += ["--num-classes", str(num_classes)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    pipe = Pipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.spec.prior.layout == "taming" and pipe.spec.prior.n_head == HEADS
    assert set(pipe.conditioners) == ({"label"} if num_classes else set())
    conds = {"label": [0, 2]} if num_classes else {}
    out = pipe(
        num_images=2, generator=torch.Generator().manual_seed(0), output_type="tensor", **conds
    )
    assert out.shape == (2, 3, 16, 16)
    codes = pipe.encode(images())
    assert torch.isfinite(pipe.prior.log_prob(codes, pipe.condition(**conds) or None)).all()


def test_convert_refuses_a_vqgan_as_transformer(tmp_path):
    ckpt = _save_ckpt(tmp_path / "vq.ckpt", fake_taming_state_dict())
    res = CliRunner().invoke(
        main, ["convert", "taming-transformer", str(ckpt), str(tmp_path / "p"), "--n-head", "2"]
    )
    assert res.exit_code != 0 and "taming-vqgan" in res.output
    assert not (tmp_path / "p").exists()


def test_convert_needs_heads(tmp_path):
    first = {f"first_stage_model.{k}": v for k, v in fake_taming_state_dict().items()}
    ckpt = _save_ckpt(tmp_path / "n.ckpt", {**first, **_gpt(N_EMBED, GRID * GRID)})
    res = CliRunner().invoke(
        main, ["convert", "taming-transformer", str(ckpt), str(tmp_path / "p")]
    )
    assert res.exit_code != 0 and "--n-head" in res.output


def _net2net_without_discriminator(tmp_path):
    """A Net2NetTransformer whose first stage has no discriminator (their DummyLoss setup)."""
    first = {
        f"first_stage_model.{k}": v
        for k, v in fake_taming_state_dict().items()
        if not k.startswith("loss.discriminator.")
    }
    return _save_ckpt(tmp_path / "n.ckpt", {**first, **_gpt(N_EMBED, GRID * GRID)})


def test_convert_taming_transformer_is_deterministic(tmp_path):
    """The missing discriminator is seeded: two conversions write identical files."""
    ckpt = _net2net_without_discriminator(tmp_path)
    for out in ("a", "b"):
        args = ["convert", "taming-transformer", str(ckpt), str(tmp_path / out), "--n-head", "2"]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert any(f.name == "weights.safetensors" for f in files)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_convert_taming_transformer_sos_token(tmp_path):
    ckpt = _net2net_without_discriminator(tmp_path)
    args = ["convert", "taming-transformer", str(ckpt), str(tmp_path / "p"), "--n-head", "2"]
    res = CliRunner().invoke(main, [*args, "--sos-token", "5"])
    assert res.exit_code == 0, res.output
    pipe = Pipeline.from_pretrained(tmp_path / "p")
    gpt = _gpt(N_EMBED, GRID * GRID)
    assert torch.equal(pipe.prior.state_dict()["sos"], gpt["transformer.tok_emb.weight"][5])
    res = CliRunner().invoke(main, [*args, "--sos-token", str(N_EMBED)])
    assert res.exit_code != 0 and f"sos_token={N_EMBED} is outside the token table" in res.output
    res = CliRunner().invoke(main, [*args, "--sos-token", "1", "--num-classes", "3"])
    assert res.exit_code != 0 and "--sos-token applies to unconditional models only" in res.output
