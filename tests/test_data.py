"""Built-in data: seeded shapes with paired conditions, and users' image folders."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from latentgen import registry
from latentgen.data.shapes import CLASSES, ShapesConfig, ShapesDataset
from latentgen.errors import DataError


def test_shapes_items_are_seeded_and_order_free():
    a = ShapesDataset(ShapesConfig(size=10, image_size=24, seed=3))
    b = ShapesDataset(ShapesConfig(size=10, image_size=24, seed=3))
    for i in (7, 2, 7):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["label"] == y["label"]
    c = ShapesDataset(ShapesConfig(size=10, image_size=24, seed=4))
    assert not torch.equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("size", [8, 33, 64])
def test_shapes_any_resolution_with_paired_conditions(size):
    ds = registry.build("dataset", {"type": "shapes", "size": 20, "image_size": size})
    for i in range(20):
        item = ds[i]
        assert item["image"].shape == (3, size, size)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert 0 <= item["label"] < len(CLASSES)
        seg = item["segmentation"]
        assert seg.shape == (size, size) and seg.dtype == torch.long
        assert item["depth"].shape == (1, size, size)
        assert item["pose"].shape == (5, 3)
        if size >= 33:
            # The main shape is drawn last (in front), so its class owns the most pixels.
            counts = torch.bincount(seg.flatten(), minlength=len(CLASSES) + 1)[1:]
            assert int(counts.argmax()) == item["label"]
            # The pose centre lies on the main shape (except for the ring's hole).
            x, y, _ = item["pose"][0].tolist()
            if CLASSES[item["label"]] != "ring":
                assert (
                    seg[min(int(y * size), size - 1), min(int(x * size), size - 1)]
                    == item["label"] + 1
                )
            # Nearer things have smaller depth: the main shape is in front of the background.
            fg = seg == item["label"] + 1
            assert item["depth"][0][fg].mean() < item["depth"][0][seg == 0].mean()


def test_squares_sit_on_a_side_and_diamonds_on_a_corner():
    # A freely turned square would be a diamond; these two classes stay near upright. The pose
    # corners (-1,-1) and (1,-1) of the bounding square give the turn.
    import math

    ds = ShapesDataset(ShapesConfig(size=120, image_size=32, max_distractors=0))
    seen = {CLASSES.index("square"): 0, CLASSES.index("diamond"): 0}
    for i in range(len(ds)):
        item = ds[i]
        if item["label"] in seen and item["pose"][1:3, 2].all():
            (x1, y1, _), (x2, y2, _) = item["pose"][1].tolist(), item["pose"][2].tolist()
            assert abs(math.degrees(math.atan2(y2 - y1, x2 - x1))) <= 10.01, (i, item["label"])
            seen[item["label"]] += 1
    assert min(seen.values()) >= 5, seen
    # and the other classes still turn freely
    turns = [
        math.degrees(
            math.atan2(it["pose"][2][1] - it["pose"][1][1], it["pose"][2][0] - it["pose"][1][0])
        )
        for it in (ds[i] for i in range(len(ds)))
        if CLASSES[it["label"]] in ("triangle", "cross") and it["pose"][1:3, 2].all()
    ]
    assert max(abs(t) for t in turns) > 45


def test_shapes_num_classes_bounds():
    with pytest.raises(ValueError):
        ShapesConfig(num_classes=len(CLASSES) + 1)


def _write(path, colour=(255, 0, 0), size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_reads_and_labels(tmp_path):
    _write(tmp_path / "cats" / "a.png")
    _write(tmp_path / "dogs" / "b.jpg", (0, 0, 255))
    ds = registry.build("dataset", {"type": "image_folder", "root": str(tmp_path), "image_size": 8})
    assert len(ds) == 2 and ds.classes == ("cats", "dogs")
    item = ds[1]
    assert item["image"].shape == (3, 8, 8) and item["label"] == 1
    assert item["image"][2].mean() > 0.9 and item["image"][0].mean() < -0.9


def test_image_folder_corrupt_file_is_named(tmp_path):
    _write(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = registry.build("dataset", {"type": "image_folder", "root": str(tmp_path), "image_size": 8})
    idx = [p.name for p in ds.files].index("broken.png")
    with pytest.raises(DataError, match="broken.png.*skip_corrupt"):
        ds[idx]


def test_image_folder_skip_corrupt_counts(tmp_path):
    _write(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"garbage")
    ds = registry.build(
        "dataset",
        {"type": "image_folder", "root": str(tmp_path), "image_size": 8, "skip_corrupt": True},
    )
    assert len(ds) == 1 and ds.num_skipped == 1 and ds.skipped[0].name == "broken.png"


def test_image_folder_empty_or_missing(tmp_path):
    with pytest.raises(DataError, match="holds no image files"):
        registry.build("dataset", {"type": "image_folder", "root": str(tmp_path)})
    with pytest.raises(DataError, match="does not exist"):
        registry.build("dataset", {"type": "image_folder", "root": str(tmp_path / "nope")})


def _scene_offsets(cfg: ShapesConfig, i: int, item: dict) -> list[tuple[int, int]]:
    """Aligned offsets at which ``item`` is the cut of scene item ``i``'s 2x2 mosaic."""
    from latentgen.data.shapes import _SCENE_STREAM, render_shapes

    n = cfg.image_size
    cells = cfg.model_copy(update={"seed": cfg.seed + _SCENE_STREAM * 10**6 + 4 * i})
    parts = [render_shapes(k, cells) for k in range(4)]

    def mosaic(key: str) -> torch.Tensor:
        top = torch.cat([parts[0][key], parts[1][key]], -1)
        return torch.cat([top, torch.cat([parts[2][key], parts[3][key]], -1)], -2)

    image, seg = mosaic("image"), mosaic("segmentation")  # [3, 2n, 2n], [2n, 2n]
    return [
        (t, left)
        for t in range(0, n + 1, cfg.scene_align)
        for left in range(0, n + 1, cfg.scene_align)
        if torch.equal(item["image"], image[:, t : t + n, left : left + n])
        and torch.equal(item["segmentation"], seg[t : t + n, left : left + n])
    ]


def test_scene_windows_are_aligned_cuts_of_a_mosaic_of_items():
    cfg = ShapesConfig(size=200, image_size=16, seed=5, scene_fraction=0.4, scene_align=4)
    ds, plain = ShapesDataset(cfg), ShapesDataset(cfg.model_copy(update={"scene_fraction": 0.0}))
    scene = [i for i in range(200) if ds[i]["label"] == -1]
    assert 0.3 < len(scene) / 200 < 0.5, len(scene)
    for i in range(200):  # every other item is the plain item, unchanged
        if i not in scene:
            assert torch.equal(ds[i]["image"], plain[i]["image"])
    offsets = set()
    for i in scene[:12]:
        item = ds[i]
        hits = _scene_offsets(cfg, i, item)
        assert hits, f"scene item {i} is not a 4-pixel-aligned cut of its 2x2 mosaic"
        offsets.update(hits)
        assert item["pose"].shape == (5, 3) and not item["pose"][:, 2].any()  # no main shape
        assert item["depth"].shape == (1, 16, 16)
    assert len(offsets) >= 4, offsets  # windows land at many places, not one
