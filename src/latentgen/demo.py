"""The README's main job: train both stages on the built-in shapes data and write image grids.

``run_demo`` trains a small VQGAN (stage 1) and a class-conditional transformer prior (stage 2)
with the shipped configs (``latentgen/configs/*.yaml``) on a CPU in a few minutes, then samples
one row per class. ``run_toy_demo`` does the same in seconds with the outside plugin
``latentgen-toy`` (a k-means palette tokenizer and a counting n-gram prior).
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from latentgen.data.base import to_pil
from latentgen.data.shapes import CLASSES, ShapesConfig, ShapesDataset
from latentgen.pipeline import Pipeline
from latentgen.utils import image_grid

__all__ = ["demo_configs", "run_demo", "run_toy_demo"]


def demo_configs(out: Path) -> tuple[Path, Path]:
    """Write the shipped stage-1 and stage-2 configs into ``out``, with runs under ``out/runs``."""
    files = resources.files("latentgen") / "configs"
    tok = yaml.safe_load((files / "shapes-vqgan.yaml").read_text())
    prior = yaml.safe_load((files / "shapes-transformer.yaml").read_text())
    runs = out / "runs"
    tok["trainer"]["runs_dir"] = str(runs)
    prior["trainer"]["runs_dir"] = str(runs)
    prior["tokenizer_path"] = str(runs / tok["trainer"]["run_name"])
    paths = out / "shapes-vqgan.yaml", out / "shapes-transformer.yaml"
    for path, cfg in zip(paths, (tok, prior)):
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def run_demo(out: str | Path = "out/demo", seed: int = 0) -> dict[str, Path]:
    """Train the VQGAN, then the prior on its codes, then sample; returns the paths written."""
    from latentgen.training.cli import train_prior, train_tokenizer

    out = Path(out)
    shutil.rmtree(out / "runs", ignore_errors=True)  # the demo's own runs start afresh
    out.mkdir(parents=True, exist_ok=True)
    tok_cfg, prior_cfg = demo_configs(out)
    # Through click's own parsing, so every option the commands gain keeps its default here.
    print(f"stage 1: training a VQGAN ({tok_cfg})")
    train_tokenizer.main(["--config", str(tok_cfg)], standalone_mode=False)
    print(f"stage 2: training a transformer prior on its codes ({prior_cfg})")
    train_prior.main(["--config", str(prior_cfg)], standalone_mode=False)
    final = out / "runs" / yaml.safe_load(prior_cfg.read_text())["trainer"]["run_name"] / "final"
    pipe = Pipeline.from_pretrained(final)
    return _write_grids(pipe, out, image_size=32, seed=seed) | {"pipeline": final}


def _write_grids(pipe: Pipeline, out: Path, image_size: int, seed: int) -> dict[str, Path]:
    """One row of samples per class, and held-out originals over their reconstructions."""
    per_class = 6
    samples = pipe(
        label=list(range(len(CLASSES))),
        num_images=per_class * len(CLASSES),
        size=image_size,
        generator=torch.Generator().manual_seed(seed),
    )
    image_grid(samples, nrow=per_class).save(out / "samples.png")  # row r holds class r
    held_out = ShapesDataset(ShapesConfig(size=8, image_size=image_size, seed=seed + 10**6))
    test = torch.stack([held_out[i]["image"] for i in range(8)])  # [8, 3, S, S]
    pairs = torch.cat([test, pipe.reconstruct(test)])
    image_grid(to_pil(pairs), nrow=8).save(out / "reconstructions.png")
    print(f"samples   -> {out / 'samples.png'} (one row per class: {', '.join(CLASSES)})")
    print(f"originals over reconstructions -> {out / 'reconstructions.png'}")
    return {"samples": out / "samples.png", "reconstructions": out / "reconstructions.png"}


def run_toy_demo(
    out: str | Path = "out/demo", num_train: int = 2048, image_size: int = 32, seed: int = 0
) -> dict[str, Path]:
    """The toy plugin's pipeline: fit (by counting), save, reload and sample, in seconds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(ShapesConfig(size=num_train, image_size=image_size, seed=seed))
    images = torch.stack([data[i]["image"] for i in range(num_train)])  # [N, 3, S, S]
    labels = [data[i]["label"] for i in range(num_train)]
    pipe = Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 32, "downsample": 4},
            "prior": {
                "type": "toy.ngram",
                "vocab_size": 32,
                "order": 4,
                "alpha": 0.01,
                "conditions": {"label": {"vocab_size": len(CLASSES)}},
            },
            "conditioners": {
                "label": {
                    "type": "class_label",
                    "num_classes": len(CLASSES),
                    "class_names": list(CLASSES),
                }
            },
            "sampler": {"temperature": 0.9, "top_k": 8},
        }
    )
    tokenizer: Any = pipe.tokenizer  # the toy classes' own fit() methods
    prior: Any = pipe.prior
    tokenizer.fit(images[:512], generator=torch.Generator().manual_seed(seed))
    codes = pipe.encode(images)
    prior.fit(codes, pipe.condition(label=labels))
    held_out = ShapesDataset(ShapesConfig(size=64, image_size=image_size, seed=seed + 10**6))
    test = torch.stack([held_out[i]["image"] for i in range(64)])
    test_labels = [held_out[i]["label"] for i in range(64)]
    bits = float(
        -pipe.log_likelihood(test, label=test_labels).mean()
        / (pipe.encode(test)[0].numel() * torch.log(torch.tensor(2.0)))
    )

    pipe_dir = pipe.save_pretrained(
        out / "pipeline",
        card={
            "image_size": image_size,
            "dataset": "shapes (built-in, synthetic)",
            "value_range": [-1, 1],
            "downsample": pipe.tokenizer.downsample,
        },
    )
    pipe = Pipeline.from_pretrained(pipe_dir)  # sample from what is on disk
    print(f"held-out NLL: {bits:.3f} bits per code ({pipe.tokenizer.vocab_size} codes)")
    print(f"pipeline  -> {pipe_dir}")
    return _write_grids(pipe, out, image_size, seed) | {"pipeline": pipe_dir}
