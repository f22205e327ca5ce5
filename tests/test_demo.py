"""The README's main job (`latentgen demo`) runs end to end: shipped configs, shrunk to seconds."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from PIL import Image

import latentgen.demo as demo
from latentgen import Pipeline


def test_demo_trains_both_stages_and_writes_grids(tmp_path, monkeypatch):
    shipped = demo.demo_configs

    def tiny(out: Path) -> tuple[Path, Path]:
        paths = shipped(out)
        for path, steps in zip(paths, (4, 4)):
            cfg = yaml.safe_load(path.read_text())
            cfg["data"]["size"] = 64
            t = cfg["trainer"]
            t.update(max_steps=steps, batch_size=4, checkpoint_every=steps, grid_every=steps)
            if "warmup_steps" in t:
                t["warmup_steps"] = 1
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return paths

    monkeypatch.setattr(demo, "demo_configs", tiny)
    written = demo.run_demo(tmp_path / "demo", seed=0)
    assert (tmp_path / "demo" / "samples.png").is_file()
    assert (tmp_path / "demo" / "reconstructions.png").is_file()
    grid = Image.open(tmp_path / "demo" / "samples.png")
    assert grid.width > 32 and grid.height > 32, grid.size
    pipe = Pipeline.from_pretrained(written["pipeline"])
    assert pipe.prior.condition_names == ("label",)
    assert pipe.card["image_size"] == [32, 32]  # trained size, so sampling needs no --size
    assert pipe(label=[1], generator=torch.Generator().manual_seed(0))[0].size == (32, 32)
