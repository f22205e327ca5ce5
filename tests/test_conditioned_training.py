"""Segmentation-to-image from the shipped configs, shrunk: train the image tokenizer, the
segmentation cond-stage tokenizer and the conditioned prior via the CLI, then sample from a map."""

from __future__ import annotations

import json
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


def _train(tmp: Path, kind: str, cfg: Path) -> None:
    res = CliRunner().invoke(main, ["train", kind, "--config", str(cfg)])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The image VQGAN, the segmentation cond-stage tokenizer and the prior, trained."""
    tmp = tmp_path_factory.mktemp("seg")
    for name in ("shapes-vqgan.yaml", "shapes-segmentation-vqvae.yaml"):
        _train(tmp, "tokenizer", _shrink(name, tmp))
    _train(tmp, "prior", _shrink("shapes-segmentation-transformer.yaml", tmp))
    return tmp


def _retarget(cfg: dict, old: str, new: str, conditioner: dict) -> dict:
    """A shipped depth config rewritten for another spatial condition (edges, low_resolution)."""
    text = yaml.safe_dump(cfg).replace(old, new)
    out = yaml.safe_load(text)
    if "spec" in out:
        out["spec"]["conditioners"][new] = conditioner
    else:
        out["data"]["conditioner"] = conditioner
    return out


def _condition_configs(cond: str, tmp: Path) -> tuple[Path | None, Path]:
    """(cond-stage tokenizer config or None, prior config) for ``cond``, shrunk."""
    if cond in ("depth", "pose"):
        return (
            _shrink(f"shapes-{cond}-vqvae.yaml", tmp),
            _shrink(f"shapes-{cond}-transformer.yaml", tmp),
        )
    tok = yaml.safe_load(_shrink("shapes-depth-vqvae.yaml", tmp).read_text())
    prior = yaml.safe_load(_shrink("shapes-depth-transformer.yaml", tmp).read_text())
    if cond == "edges":  # Sobel edges of the images, through a trained one-channel vqvae
        tok_path = tmp / "shapes-edges-vqvae.yaml"
        tok_path.write_text(yaml.safe_dump(_retarget(tok, "depth", "edges", {"type": "edges"})))
        prior = _retarget(prior, "depth", "edges", {"type": "edges"})
        prior["cond_tokenizers"]["edges"] = str(tmp / "runs" / "shapes-edges-vqvae")
        prior["condition_keys"] = {"edges": "image"}  # derived from each training image
        prior_path = tmp / "shapes-edges-transformer.yaml"
        prior_path.write_text(yaml.safe_dump(prior))
        return tok_path, prior_path
    # low_resolution: the zero-training stage (4x smaller image, one token per small pixel,
    # 4 levels per channel: 64 tokens)
    lowres = {"type": "low_resolution", "factor": 4, "downsample": 1, "levels": 4}
    prior = _retarget(prior, "depth", "low_resolution", lowres)
    del prior["cond_tokenizers"]
    prior["condition_keys"] = {"low_resolution": "image"}
    prior_path = tmp / "shapes-low_resolution-transformer.yaml"
    prior_path.write_text(yaml.safe_dump(prior))
    return None, prior_path


@pytest.fixture(scope="module")
def image_tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cond")
    _train(tmp, "tokenizer", _shrink("shapes-vqgan.yaml", tmp))
    return tmp


@pytest.fixture(scope="module", params=["depth", "pose", "edges", "low_resolution"])
def trained_condition(request, image_tokenizer):
    """(condition name, final pipeline dir): cond-stage tokenizer and prior trained from the
    CLI next to the shared image tokenizer."""
    cond, tmp = request.param, image_tokenizer
    tok_cfg, prior_cfg = _condition_configs(cond, tmp)
    if tok_cfg is not None:
        _train(tmp, "tokenizer", tok_cfg)
    _train(tmp, "prior", prior_cfg)
    run = yaml.safe_load(prior_cfg.read_text())["trainer"]["run_name"]
    return cond, tmp / "runs" / run / "final"


def _raw_condition_file(cond: str, tmp: Path, size: tuple[int, int]) -> Path:
    """A condition file of the kind a user passes with -c NAME=@FILE, for an image of ``size``."""
    h, w = size
    g = np.random.default_rng(0)
    if cond == "pose":  # 5 keypoints (x, y in [0, 1], visibility)
        path = tmp / "kp.json"
        kp = [[float(x), float(y), 1.0] for x, y in g.uniform(0.2, 0.8, (5, 2))]
        path.write_text(json.dumps(kp))
        return path
    if cond == "low_resolution":  # an RGB image 4 times smaller
        path = tmp / "small.png"
        Image.fromarray(g.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)).save(path)
        return path
    # depth (grey, black = near) and edges (grey, white = edge)
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None].repeat(h, 0)
    if cond == "edges":
        ramp = np.zeros((h, w), np.float32)
        ramp[h // 3, :] = ramp[:, w // 2] = 255
    path = tmp / f"{cond}.png"
    Image.fromarray(ramp.astype(np.uint8)).save(path)
    return path


def test_each_spatial_condition_end_to_end_from_the_cli(trained_condition, tmp_path):
    cond, final = trained_condition
    pipe = Pipeline.from_pretrained(final)
    assert pipe.prior.config.window == (8, 8)  # training records the 8x8 code grid it saw
    if cond != "low_resolution":  # the trained cond-stage tokenizer went into the pipeline
        assert pipe.conditioners[cond].tokenizer is not None
    # at the trained size, then larger than the window (12x16 codes from an 8x8 window)
    for size, window in (((32, 32), None), ((48, 64), "cached"), ((48, 64), "exact")):
        raw = _raw_condition_file(cond, tmp_path, size)
        out = tmp_path / f"{cond}-{size[0]}x{size[1]}-{window}.png"
        args = ["sample", str(final), "-n", "1", "-c", f"{cond}=@{raw}", "-o", str(out)]
        if cond == "pose" or window:
            args += ["--size", f"{size[0]}x{size[1]}"]
        if window:
            args += ["--window", window]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        assert Image.open(out).size == (size[1] + 4, size[0] + 4)  # one image, 2 px frame
    # the same from Python, a batch of two from one condition
    raw = _raw_condition_file(cond, tmp_path, (48, 64))
    images = pipe(
        2,
        size=(48, 64),
        output_type="tensor",
        generator=torch.Generator().manual_seed(0),
        **{cond: str(raw)},
    )
    assert images.shape == (2, 3, 48, 64) and torch.isfinite(images).all()


def test_segmentation_to_image_end_to_end(trained):
    final = trained / "runs" / "shapes-segmentation-transformer" / "final"
    pipe = Pipeline.from_pretrained(final)
    assert pipe.prior.config.window == (8, 8)
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


def test_a_prior_window_that_is_not_the_training_grid_is_refused(trained):
    cfg = _shrink("shapes-segmentation-transformer.yaml", trained)
    data = yaml.safe_load(cfg.read_text())
    data["spec"]["prior"]["window"] = [4, 16]
    data["trainer"]["run_name"] = "bad-window"
    cfg.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["train", "prior", "--config", str(cfg)])
    assert res.exit_code != 0
    assert "the prior's window is 4x16 but it trains on 8x8 code grids" in res.output
    assert "set it to [8, 8]" in res.output
    assert not (trained / "runs" / "bad-window" / "final").exists()


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
