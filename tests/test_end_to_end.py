"""The shipped configs, shrunk: train a VQGAN, train a prior on its codes, sample — via the CLI."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from latentgen import Pipeline
from latentgen.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "latentgen" / "configs"


def _shrink(name: str, tmp: Path) -> Path:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    cfg["trainer"].update(
        max_steps=4,
        checkpoint_every=2,
        grid_every=2,
        log_every=2,
        runs_dir=str(tmp / "runs"),
        batch_size=4,
        warmup_steps=min(cfg["trainer"].get("warmup_steps", 0), 1),
    )
    cfg["data"]["size"] = 16
    for tok in (cfg.get("tokenizer"), cfg.get("spec", {}).get("tokenizer")):
        if tok:
            tok["disc_start"] = 2  # exercise the discriminator update too
            tok["perceptual_weight"] = 1.0  # and LPIPS on its real weights
    if "tokenizer_path" in cfg:
        cfg["tokenizer_path"] = str(tmp / "runs" / "shapes-vqgan")
    out = tmp / name
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_train_tokenizer_then_prior_then_sample(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        main, ["train", "tokenizer", "--config", str(_shrink("shapes-vqgan.yaml", tmp_path))]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main, ["train", "prior", "--config", str(_shrink("shapes-transformer.yaml", tmp_path))]
    )
    assert res.exit_code == 0, res.output
    # stage-1 evaluation, rFID included (a stand-in TorchScript Inception: the real one is
    # never downloaded)
    import json
    import warnings

    import torch

    from test_metrics import _FakeInception

    fake = tmp_path / "inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_FakeInception()), str(fake))
    data_cfg = _shrink("shapes-vqgan.yaml", tmp_path)
    res = runner.invoke(
        main,
        [
            "eval",
            "tokenizer",
            str(tmp_path / "runs" / "shapes-vqgan"),
            "--data",
            str(data_cfg),
            "--limit",
            "16",
            "--inception",
            str(fake),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output[res.output.index("{") :])
    assert {"psnr_db", "ssim", "lpips", "rfid", "codebook_usage", "perplexity"} <= set(metrics)
    assert metrics["rfid"] >= 0

    final = tmp_path / "runs" / "shapes-transformer" / "final"
    res = runner.invoke(
        main, ["eval", "prior", str(final), "--data", str(data_cfg), "--limit", "8"]
    )
    assert res.exit_code == 0, res.output
    assert "bits" in res.output
    pipe = Pipeline.from_pretrained(final)
    assert pipe.spec.prior.type == "transformer" and pipe.spec.tokenizer.type == "vqgan"
    out = tmp_path / "grid.png"
    res = runner.invoke(
        main, ["sample", str(final), "-n", "2", "-c", "label=[0,1]", "--size", "32", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 0


def test_prior_config_without_trained_tokenizer_says_what_to_do(tmp_path):
    cfg = _shrink("shapes-transformer.yaml", tmp_path)  # points at a run that does not exist
    res = CliRunner().invoke(main, ["train", "prior", "--config", str(cfg)])
    assert res.exit_code != 0
    assert "holds no trained tokenizer" in res.output
    assert "latentgen train tokenizer" in res.output
