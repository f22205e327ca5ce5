"""A large image from a segmentation map: the scene, the coloured map, both files written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentgen import Pipeline
from latentgen.conditioners.scene import (
    colour_segmentation,
    generate_from_segmentation,
    shapes_scene,
)
from latentgen.data.shapes import ShapesConfig, ShapesDataset
from latentgen.errors import InputError


def _pipe() -> Pipeline:
    return Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 16, "downsample": 4},
            "prior": {
                "type": "transformer",
                "vocab_size": 16,
                "block_size": 64,  # an 8x8 window: 32x32 pixels
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 16,
                "conditions": {"segmentation": {"vocab_size": 7, "num_tokens": 64}},
            },
            "conditioners": {"segmentation": {"type": "segmentation", "num_classes": 7}},
        }
    )


def test_shapes_scene_is_a_mosaic_of_the_shapes_maps():
    scene = shapes_scene((64, 96), cell=32, seed=5)
    assert scene.shape == (64, 96) and scene.dtype == torch.long
    data = ShapesDataset(ShapesConfig(size=6, image_size=32, seed=5))
    assert torch.equal(scene[32:64, 32:64], data[4]["segmentation"])  # row 1, column 1
    assert torch.equal(scene[0:32, 64:96], data[2]["segmentation"])
    with pytest.raises(InputError, match="not a multiple of the 32-pixel cell; use e.g. 64x96"):
        shapes_scene((70, 100))


def test_generate_from_segmentation_writes_the_image_and_the_map(tmp_path):
    ids = shapes_scene((96, 128))  # 24x32 codes from an 8x8 window
    out, map_path = generate_from_segmentation(
        _pipe(), ids, tmp_path / "big.png", generator=torch.Generator().manual_seed(0)
    )
    assert out == tmp_path / "big.png" and map_path == tmp_path / "big-map.png"
    assert Image.open(out).size == (128, 96)
    picture = np.array(Image.open(map_path))
    assert picture.shape == (96, 128, 3)
    assert np.array_equal(picture, np.array(colour_segmentation(ids)))
    # one colour per class: pixels of one class share it, two classes differ
    c1, c2 = (picture[ids.numpy() == k][0] for k in np.unique(ids.numpy())[:2])
    assert not np.array_equal(c1, c2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big-map.png", "big.png"]


def test_bad_input_writes_nothing(tmp_path):
    ids = shapes_scene((64, 64))
    ids[0, 0] = 9  # outside the 7 classes
    with pytest.raises(InputError, match="class id 9, outside"):
        generate_from_segmentation(_pipe(), ids, tmp_path / "big.png")
    with pytest.raises(InputError, match="no conditioner 'seg'"):
        generate_from_segmentation(_pipe(), shapes_scene(64), tmp_path / "big.png", name="seg")
    with pytest.raises(InputError, match="window must be 'cached' or 'exact', got 'fast'"):
        generate_from_segmentation(_pipe(), shapes_scene(64), tmp_path / "b.png", window="fast")
    with pytest.raises(InputError, match="must be a .png"):
        generate_from_segmentation(_pipe(), shapes_scene(64), tmp_path / "big.jpg")
    assert not list(tmp_path.iterdir())
