"""The README's main job: build a pipeline on the built-in shapes data and write sample grids.

It uses the outside plugin ``latentgen-toy`` (a k-means palette tokenizer and a counting n-gram
prior), so it runs in seconds on a CPU and shows a third-party plugin working end to end.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentgen.data.base import to_pil
from latentgen.data.shapes import CLASSES, ShapesConfig, ShapesDataset
from latentgen.pipeline import Pipeline
from latentgen.utils import image_grid

__all__ = ["run_demo"]


def run_demo(out: str | Path = "out/demo", num_train: int = 2048, image_size: int = 32,
             seed: int = 0) -> dict[str, Path]:
    """Fit, save, reload and sample; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(ShapesConfig(size=num_train, image_size=image_size, seed=seed))
    images = torch.stack([data[i]["image"] for i in range(num_train)])  # [N, 3, S, S]
    labels = [data[i]["label"] for i in range(num_train)]
    pipe = Pipeline.from_spec({
        "tokenizer": {"type": "toy.palette", "vocab_size": 32, "downsample": 4},
        "prior": {"type": "toy.ngram", "vocab_size": 32, "order": 4, "alpha": 0.01,
                  "conditions": {"label": {"vocab_size": len(CLASSES)}}},
        "conditioners": {"label": {"type": "class_label", "num_classes": len(CLASSES),
                                   "class_names": list(CLASSES)}},
        "sampler": {"temperature": 0.9, "top_k": 8},
    })
    pipe.tokenizer.fit(images[:512], generator=torch.Generator().manual_seed(seed))
    codes = pipe.encode(images)
    pipe.prior.fit(codes, pipe.condition(label=labels))
    held_out = ShapesDataset(ShapesConfig(size=64, image_size=image_size, seed=seed + 10**6))
    test = torch.stack([held_out[i]["image"] for i in range(64)])
    test_labels = [held_out[i]["label"] for i in range(64)]
    bits = float(-pipe.log_likelihood(test, label=test_labels).mean()
                 / (pipe.encode(test)[0].numel() * torch.log(torch.tensor(2.0))))

    pipe_dir = pipe.save_pretrained(out / "pipeline", card={
        "image_size": image_size, "dataset": "shapes (built-in, synthetic)",
        "value_range": [-1, 1], "downsample": pipe.tokenizer.downsample,
    })
    pipe = Pipeline.from_pretrained(pipe_dir)  # sample from what is on disk
    per_class = 6
    samples = pipe(label=list(range(len(CLASSES))), num_images=per_class * len(CLASSES),
                   generator=torch.Generator().manual_seed(seed))
    # repeat_interleave order: row r holds class r
    image_grid(samples, nrow=per_class).save(out / "samples.png")
    pairs = torch.cat([test[:8], pipe.reconstruct(test[:8])])
    image_grid(to_pil(pairs), nrow=8).save(out / "reconstructions.png")
    print(f"held-out NLL: {bits:.3f} bits per code ({pipe.tokenizer.vocab_size} codes)")
    print(f"pipeline  -> {pipe_dir}")
    print(f"samples   -> {out / 'samples.png'} (one row per class: {', '.join(CLASSES)})")
    print(f"originals over reconstructions -> {out / 'reconstructions.png'}")
    return {"pipeline": pipe_dir, "samples": out / "samples.png",
            "reconstructions": out / "reconstructions.png"}
