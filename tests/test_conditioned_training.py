"""Segmentation-to-image from the shipped configs, shrunk: train the image tokenizer, the
segmentation cond-stage tokenizer and the conditioned prior via the CLI, then sample from a map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from latentgen import Pipeline
from latentgen.cli import main
from latentgen.data.shapes import ShapesConfig, ShapesDataset

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "latentgen" / "configs"


def _shrink(name: str, tmp: Path, **top) -> Path:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    cfg["trainer"].update(
        max_steps=2,
        checkpoint_every=2,
        grid_every=2,
        log_every=1,
        runs_dir=str(tmp / "runs"),
        batch_size=4,
    )
    data = cfg["data"].get("data", cfg["data"])  # condition_maps wraps the shapes data
    data["size"] = 8
    tok = cfg.get("tokenizer")
    if tok:
        tok.update(ch=16, z_channels=16)
        tok["quantizer"].update(kmeans_init=False)
        if tok["type"] == "vqgan":
            tok["disc_start"] = 100
    if "tokenizer_path" in cfg:
        cfg["tokenizer_path"] = str(tmp / "runs" / "shapes-vqgan")
        cfg["spec"]["prior"].update(n_layer=1, n_embd=32)
    for name_, path in cfg.get("cond_tokenizers", {}).items():
        cfg["cond_tokenizers"][name_] = str(tmp / path)
    cfg.update(top)
    out = tmp / name
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    runner = CliRunner()
    for name in ("shapes-vqgan.yaml", "shapes-segmentation-vqvae.yaml"):
        res = runner.invoke(main, ["train", "tokenizer", "--config", str(_shrink(name, tmp))])
        assert res.exit_code == 0, res.output
    cfg = _shrink("shapes-segmentation-transformer.yaml", tmp)
    res = runner.invoke(main, ["train", "prior", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    return tmp


def test_segmentation_to_image_end_to_end(trained):
    final = trained / "runs" / "shapes-segmentation-transformer" / "final"
    pipe = Pipeline.from_pretrained(final)
    seg = pipe.conditioners["segmentation"]
    # the conditioner holds the trained cond-stage tokenizer, saved with the pipeline
    from latentgen.artifact import load_component

    trained_tok = load_component(trained / "runs" / "shapes-segmentation-vqvae", "tokenizer")
    for key, value in trained_tok.state_dict().items():
        assert torch.equal(seg.tokenizer.state_dict()[key], value), key
    assert seg.tokenizer.config.recon_loss == "cross_entropy"

    ids = ShapesDataset(ShapesConfig(size=2, image_size=32))[1]["segmentation"]
    Image.fromarray(ids.numpy().astype(np.uint8)).save(trained / "map.png")
    out = trained / "samples.png"
    res = CliRunner().invoke(
        main,
        [
            "sample",
            str(final),
            "-n",
            "2",
            "-c",
            f"segmentation=@{trained / 'map.png'}",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "wrote 2 images" in res.output and out.stat().st_size > 0

    # held-out NLL of the conditioned prior, its maps encoded at the images' size
    data_cfg = trained / "shapes-segmentation-transformer.yaml"
    res = CliRunner().invoke(
        main, ["eval", "prior", str(final), "--data", str(data_cfg), "--limit", "4"]
    )
    assert res.exit_code == 0, res.output
    assert "bits" in res.output

    g = torch.Generator().manual_seed(3)
    a = pipe(segmentation=ids, output_type="tensor", generator=g)
    assert a.shape == (1, 3, 32, 32)


def test_cond_stage_vocabulary_must_match_the_prior_slot(trained):
    cfg = _shrink("shapes-segmentation-transformer.yaml", trained)
    data = yaml.safe_load(cfg.read_text())
    data["spec"]["prior"]["conditions"]["segmentation"]["vocab_size"] = 7
    data["trainer"]["run_name"] = "bad-vocab"
    cfg.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["train", "prior", "--config", str(cfg)])
    assert res.exit_code != 0
    assert "cond-stage tokenizer of 64 codes but the prior's slot for it expects 7" in res.output
    assert not (trained / "runs" / "bad-vocab" / "final").exists()


def test_cond_tokenizers_must_name_a_conditioner(trained):
    cfg = _shrink("shapes-segmentation-transformer.yaml", trained)
    data = yaml.safe_load(cfg.read_text())
    data["cond_tokenizers"]["depth"] = data["cond_tokenizers"]["segmentation"]
    cfg.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["train", "prior", "--config", str(cfg)])
    assert res.exit_code != 0
    assert "cond_tokenizers names ['depth']" in res.output


@pytest.mark.parametrize("cond", ["segmentation", "depth", "pose"])
def test_shipped_cond_stage_configs_fit_their_conditioner_and_prior(cond):
    from latentgen import registry
    from latentgen.training.config import (
        PriorTrainConfig,
        TokenizerTrainConfig,
        load_train_config,
    )

    tok_cfg = load_train_config(CONFIGS / f"shapes-{cond}-vqvae.yaml", TokenizerTrainConfig)
    tok_cfg = tok_cfg.model_copy(
        update={"data": tok_cfg.data.model_copy(update={"data": {"type": "shapes", "size": 2}})}
    )
    maps = registry.build("dataset", tok_cfg.data)[0]["image"]  # [C, 32, 32]
    tokenizer = registry.build("tokenizer", tok_cfg.tokenizer_config)
    assert maps.shape == (tokenizer.in_channels, 32, 32)
    assert tokenizer.encode(maps[None]).shape == (1, 8, 8)

    prior = yaml.safe_load((CONFIGS / f"shapes-{cond}-transformer.yaml").read_text())
    image_tok = yaml.safe_load((CONFIGS / "shapes-vqgan.yaml").read_text())["tokenizer"]
    prior["spec"]["tokenizer"] = image_tok
    prior["spec"]["conditioners"][cond]["tokenizer"] = tok_cfg.tokenizer_config.model_dump()
    spec = load_train_config(prior, PriorTrainConfig).spec
    pipe = Pipeline.from_spec(spec)  # the parts fit: grids, vocabularies, slots
    assert pipe.prior.config.conditions[cond].vocab_size == tokenizer.vocab_size
