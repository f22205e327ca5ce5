"""Spatial conditioners: raw forms, grids aligned with the code grid, bad input, pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from examples import TINY_VQVAE_16, tiny_conditioned_pipe
from latentgen import registry
from latentgen.conditioners.pose import heatmaps
from latentgen.conditioners.spatial import sobel_edges
from latentgen.data.shapes import ShapesConfig, ShapesDataset
from latentgen.errors import DataError, InputError, SpecError

TOKENIZER = TINY_VQVAE_16


def _item(i: int = 0):
    return ShapesDataset(ShapesConfig(size=4, image_size=16))[i]


def _pipe(conditioners, slots, **prior_kw):
    return tiny_conditioned_pipe(conditioners, slots, **prior_kw)


def test_segmentation_zero_training_tokens_are_centre_class_ids():
    seg = registry.build("conditioner", {"type": "segmentation", "num_classes": 7})
    ids = _item()["segmentation"]  # [16, 16]
    out = seg.encode(ids)
    assert out.grid == (4, 4) and out.vocab_size == 7
    assert torch.equal(out.tokens.view(4, 4), ids[2::4, 2::4])


def test_segmentation_png_npy_tensor_and_path_agree(tmp_path):
    seg = registry.build("conditioner", {"type": "segmentation", "num_classes": 7})
    ids = _item()["segmentation"]
    Image.fromarray(ids.numpy().astype(np.uint8), mode="L").save(tmp_path / "m.png")
    np.save(tmp_path / "m.npy", ids.numpy())
    want = seg.encode(ids).tokens
    assert torch.equal(seg.encode(tmp_path / "m.png").tokens, want)
    assert torch.equal(seg.encode(str(tmp_path / "m.npy")).tokens, want)
    assert torch.equal(seg.encode(Image.open(tmp_path / "m.png")).tokens, want)
    both = seg.encode([ids, tmp_path / "m.png"])
    assert both.batch_size == 2 and torch.equal(both.tokens[1:], want)


def test_segmentation_bad_ids_and_types():
    seg = registry.build("conditioner", {"type": "segmentation", "num_classes": 7})
    with pytest.raises(InputError, match=r"class id 9, outside \[0, 7\).*remap"):
        seg.encode(torch.full((16, 16), 9))
    with pytest.raises(InputError, match="integer class ids, got dtype torch.float32"):
        seg.encode(torch.zeros(16, 16))
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="greyscale or palette PNG"):
        seg.encode(rgb)
    with pytest.raises(InputError, match="not a multiple of 4"):
        seg.encode(torch.zeros(18, 16, dtype=torch.long))


def test_depth_levels_follow_the_map_and_png_scales_to_range(tmp_path):
    depth = registry.build("conditioner", {"type": "depth", "levels": 4})
    near, far = torch.full((1, 16, 16), -1.0), torch.full((1, 16, 16), 1.0)
    assert depth.encode(near).tokens.max() == 0 and depth.encode(far).tokens.min() == 3
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "d.png")
    assert depth.encode(tmp_path / "d.png").tokens.min() == 3
    with pytest.raises(InputError, match=r"depth map values must lie in \[-1, 1\], got \[0, 7\]"):
        depth.encode(torch.linspace(0, 7, 256).view(1, 16, 16))


def test_pose_heatmap_peaks_at_the_keypoint_and_invisible_is_empty():
    kp = torch.tensor([[[4.5 / 16, 12.5 / 16, 1.0], [0.5, 0.5, 0.0]]])  # [1, 2, 3]
    maps = heatmaps(kp, (16, 16), 0.05)  # [1, 2, 16, 16]
    y, x = divmod(int(maps[0, 0].argmax()), 16)
    assert (y, x) == (12, 4) and float(maps[0, 1].abs().max()) == 0.0


def test_pose_json_forms_and_bad_keypoints(tmp_path):
    pose = registry.build("conditioner", {"type": "pose", "num_keypoints": 5, "image_size": 16})
    kp = _item()["pose"]  # [5, 3]
    (tmp_path / "kp.json").write_text(json.dumps({"keypoints": kp.tolist()}))
    want = pose.encode(kp).tokens
    assert torch.equal(pose.encode(tmp_path / "kp.json").tokens, want)
    assert torch.equal(pose.encode(kp.tolist()).tokens, want)
    with pytest.raises(InputError, match="has 4 keypoints but this conditioner takes 5"):
        pose.encode(kp[:4])
    bad = kp.clone()
    bad[2] = torch.tensor([1.5, 0.5, 1.0])
    with pytest.raises(InputError, match=r"keypoint 2 of pose 0 is at \(1.5, 0.5\), outside"):
        pose.encode(bad)
    bad[2, 0] = float("nan")
    with pytest.raises(InputError, match="keypoint 2 of pose 0 is missing"):
        pose.encode(bad)
    hidden = kp.clone()
    hidden[2] = torch.tensor([1.5, 0.5, 0.0])  # out of range but not seen: fine
    pose.encode(hidden)


def test_edges_from_image_equal_edges_from_its_map():
    edges = registry.build("conditioner", {"type": "edges"})
    image = _item()["image"]  # [3, 16, 16]
    emap = sobel_edges(image[None])[0]  # [1, 16, 16] in [0, 1]
    assert float(emap.max()) > 0.2
    assert torch.equal(edges.encode(image[None]).tokens, edges.encode(emap).tokens)
    with pytest.raises(InputError, match=r"edge map values must lie in \[0, 1\]"):
        edges.encode(emap * 2 - 1.5)
    with pytest.raises(InputError, match="the edge map is 16x16 pixels but the requested image"):
        edges.encode(emap, size=(32, 32))


def test_low_resolution_full_image_is_averaged_down_and_wrong_size_named():
    low = registry.build("conditioner", {"type": "low_resolution", "factor": 2, "downsample": 2})
    image = _item()["image"][None]  # [1, 3, 16, 16]
    small = torch.nn.functional.avg_pool2d(image, 2)  # [1, 3, 8, 8]
    assert low.image_downsample == 4
    full = low.encode(image, size=(16, 16))
    assert full.grid == (4, 4) and torch.equal(full.tokens, low.encode(small, size=(16, 16)).tokens)
    with pytest.raises(InputError, match="low-resolution image is 4x4 pixels but the requested"):
        low.encode(small[..., :4, :4], size=(16, 16))


def test_cond_stage_tokenizer_channels_must_match_the_maps():
    tok = dict(TOKENIZER, in_channels=3)
    with pytest.raises(SpecError, match="set the tokenizer's in_channels to 7"):
        registry.build("conditioner", {"type": "segmentation", "num_classes": 7, "tokenizer": tok})


def test_segmentation_with_a_tokenizer_uses_its_codes():
    tok = dict(TOKENIZER, in_channels=7, recon_loss="cross_entropy")
    seg = registry.build(
        "conditioner", {"type": "segmentation", "num_classes": 7, "tokenizer": tok}
    )
    ids = _item()["segmentation"]
    out = seg.encode(ids)
    assert out.vocab_size == 16 and out.grid == (4, 4)
    maps = seg.prepare(ids)  # one-hot [1, 7, 16, 16]
    assert torch.equal(out.tokens.view(1, 4, 4), seg.tokenizer.encode(maps))


def test_pipeline_with_segmentation_and_class_label():
    pipe = _pipe(
        {
            "segmentation": {"type": "segmentation", "num_classes": 7},
            "label": {"type": "class_label", "num_classes": 6},
        },
        {"segmentation": {"vocab_size": 7, "num_tokens": 16}, "label": {"vocab_size": 6}},
    )
    it = _item()
    g = torch.Generator().manual_seed(0)
    images = pipe(segmentation=it["segmentation"], label=[it["label"]], generator=g)
    assert images[0].size == (16, 16)  # size implied by the map
    two = pipe(
        segmentation=torch.stack([it["segmentation"], _item(1)["segmentation"]]),
        label=[0, 1],
        output_type="tensor",
    )
    assert two.shape == (2, 3, 16, 16)
    with pytest.raises(
        InputError, match="segmentation map is 16x16 pixels but the requested image is 32x32"
    ):
        pipe(segmentation=it["segmentation"], label=[0], size=32)
    with pytest.raises(
        InputError,
        match=r"conditions do not match this pipeline \(unknown "
        r"\['depth'\]",
    ):
        pipe(segmentation=it["segmentation"], label=[0], depth=it["depth"])


def test_a_condition_grid_may_be_coarser_by_a_whole_factor_never_finer():
    # one segmentation token per 2x2 codes: 4 prefix tokens for the 4x4 code grid
    # (with a label beside it: each condition is checked with its own factor)
    conds = {
        "segmentation": {"type": "segmentation", "num_classes": 7, "downsample": 8},
        "label": {"type": "class_label", "num_classes": 6},
    }
    slots = {"segmentation": {"vocab_size": 7, "num_tokens": 4}, "label": {"vocab_size": 6}}
    pipe = _pipe(conds, slots, window=(4, 4))
    seg = _item()["segmentation"]  # [16, 16]
    tokens = pipe.condition(segmentation=seg, label=[1])["segmentation"]
    assert tokens.grid == (2, 2) and torch.equal(tokens.tokens.view(2, 2), seg[4::8, 4::8])
    out = pipe(
        segmentation=seg,
        label=[1],
        output_type="tensor",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (1, 3, 16, 16)
    # beyond the trained grid the sliding window crops the coarse map with the codes
    big = seg.repeat(2, 3)  # [32, 48]: 8x12 codes, a 4x6 condition grid
    for mode in ("exact", "cached"):
        img = pipe(segmentation=big, label=[1], sampler={"window": mode}, output_type="tensor")
        assert img.shape == (1, 3, 32, 48), mode
    with pytest.raises(SpecError, match=r"one token per 2x2 codes, 4 for .*\.num_tokens = 4 "):
        _pipe(conds, {**slots, "segmentation": {"vocab_size": 7, "num_tokens": 16}}, window=(4, 4))
    with pytest.raises(
        SpecError,
        match=r"one token per 2x2 image pixels but the tokenizer one "
        r"code per 4x4.*neither the code grid nor a whole factor coarser.*downsample = 4",
    ):
        _pipe(
            {"depth": {"type": "depth", "downsample": 2}},
            {"depth": {"vocab_size": 16, "num_tokens": 64}},
        )
    with pytest.raises(SpecError, match=r"one token per 6x6 image pixels"):
        _pipe(
            {"depth": {"type": "depth", "downsample": 6}},
            {"depth": {"vocab_size": 16, "num_tokens": 4}},
        )


def test_cli_sample_with_every_spatial_condition_file(tmp_path):
    from click.testing import CliRunner

    from latentgen.cli import main

    conds = {
        "segmentation": {"type": "segmentation", "num_classes": 7},
        "depth": {"type": "depth"},
        "pose": {"type": "pose", "num_keypoints": 5},
        "edges": {"type": "edges"},
        "low_resolution": {"type": "low_resolution", "factor": 2, "downsample": 2},
    }
    vocab = {"segmentation": 7, "depth": 16, "pose": 6, "edges": 8, "low_resolution": 64}
    pipe = _pipe(conds, {n: {"vocab_size": v, "num_tokens": 16} for n, v in vocab.items()})
    pipe.save_pretrained(tmp_path / "p")
    it = _item()
    Image.fromarray(it["segmentation"].numpy().astype(np.uint8)).save(tmp_path / "map.png")
    depth8 = ((it["depth"][0] + 1) * 127.5).round().numpy().astype(np.uint8)
    Image.fromarray(depth8).save(tmp_path / "d.png")
    (tmp_path / "kp.json").write_text(json.dumps(it["pose"].tolist()))
    edge8 = (sobel_edges(it["image"][None])[0, 0] * 255).round().numpy().astype(np.uint8)
    Image.fromarray(edge8).save(tmp_path / "e.png")
    small = torch.nn.functional.avg_pool2d(it["image"][None], 2)[0]  # [3, 8, 8]
    small8 = ((small + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)
    Image.fromarray(small8).save(tmp_path / "small.png")
    args = ["sample", str(tmp_path / "p"), "-n", "2", "-o", str(tmp_path / "s.png")]
    for flag in (
        "segmentation=@map.png",
        "depth=@d.png",
        "pose=@kp.json",
        "edges=@e.png",
        "low_resolution=@small.png",
    ):
        name, _, file = flag.partition("=@")
        args += ["-c", f"{name}=@{tmp_path / file}"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "wrote 2 images" in res.output and (tmp_path / "s.png").is_file()

    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(tmp_path / "bad.png")
    bad = [
        a if not a.startswith("segmentation=") else f"segmentation=@{tmp_path / 'bad.png'}"
        for a in args
    ]
    res = CliRunner().invoke(main, bad)
    assert res.exit_code != 0 and "class id 9, outside [0, 7)" in res.output


def _paired(root, stems=("a", "b"), conds=("segmentation", "depth", "pose")):
    for sub in ("images", *conds):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s in stems:
        Image.new("RGB", (24, 16), (200, 10, 10)).save(root / "images" / f"{s}.png")
        if "segmentation" in conds:
            ids = np.zeros((16, 24), np.uint8)
            ids[:, 12:] = 3
            Image.fromarray(ids).save(root / "segmentation" / f"{s}.png")
        if "depth" in conds:
            np.save(root / "depth" / f"{s}.npy", np.full((16, 24), 0.5, np.float32))
        if "pose" in conds:
            (root / "pose" / f"{s}.json").write_text(json.dumps([[0.5, 0.5, 1], [0.1, 0.5, 1]]))


def test_paired_folder_items_are_cropped_alike(tmp_path):
    _paired(tmp_path)
    cfg = {
        "type": "paired_folder",
        "root": str(tmp_path),
        "image_size": 16,
        "conditions": ["segmentation", "depth", "pose"],
    }
    data = registry.build("dataset", cfg)
    item = data[0]
    assert item["image"].shape == (3, 16, 16) and item["segmentation"].shape == (16, 16)
    # the 24-wide map is centre-cropped by 4 columns: ids switch at column 12 - 4 = 8
    assert item["segmentation"][0, 7] == 0 and item["segmentation"][0, 8] == 3
    assert torch.allclose(item["depth"], torch.full((1, 16, 16), 0.5))
    # x = 0.5 of 24 px is 12, minus the 4 px crop: 8 of 16; x = 0.1 is cropped away (not seen)
    assert item["pose"][0].tolist() == [0.5, 0.5, 1.0] and item["pose"][1, 2] == 0


def test_paired_folder_names_every_missing_partner_and_size_mismatch(tmp_path):
    _paired(tmp_path, conds=("segmentation", "depth"))
    (tmp_path / "segmentation" / "b.png").unlink()
    np.save(tmp_path / "depth" / "a.npy", np.zeros((8, 8), np.float32))
    Image.new("L", (24, 16)).save(tmp_path / "segmentation" / "zzz.png")
    cfg = {
        "type": "paired_folder",
        "root": str(tmp_path),
        "image_size": 16,
        "conditions": ["segmentation", "depth"],
    }
    with pytest.raises(DataError) as e:
        registry.build("dataset", cfg)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "images/b.png has no partner in segmentation/" in msg
    assert "depth/a.npy is 8x8 but images/a.png is 16x24" in msg
    assert "segmentation/zzz.png has no image in images/" in msg


def test_prior_training_derives_edges_and_low_resolution_from_the_images():
    from latentgen.training.prior_task import PriorTask

    conds = {
        "edges": {"type": "edges"},
        "low_resolution": {"type": "low_resolution", "factor": 2, "downsample": 2},
    }
    slots = {
        "edges": {"vocab_size": 8, "num_tokens": 16},
        "low_resolution": {"vocab_size": 64, "num_tokens": 16},
    }
    pipe = _pipe(conds, slots)
    images = torch.stack([_item(i)["image"] for i in range(2)])  # [2, 3, 16, 16]
    task = PriorTask(
        pipe.prior,
        pipe.conditioners,
        tokenizer=pipe.tokenizer,
        condition_keys={"edges": "image", "low_resolution": "image"},
    )
    batch = {"codes": pipe.encode(images), "image": images}
    got = task.conditions(batch)
    assert got["edges"].grid == got["low_resolution"].grid == (4, 4)
    small = torch.nn.functional.avg_pool2d(images, 2)
    want = pipe.conditioners["low_resolution"].encode(small)
    assert torch.equal(got["low_resolution"].tokens, want.tokens)
    loss = pipe.prior.loss(batch["codes"], got)
    assert torch.isfinite(loss)


def test_pose_alone_samples_at_its_configured_size():
    pipe = _pipe(
        {"pose": {"type": "pose", "num_keypoints": 5, "image_size": 16}},
        {"pose": {"vocab_size": 6, "num_tokens": 16}},
    )
    kp = _item()["pose"]
    assert pipe(pose=kp, output_type="tensor").shape == (1, 3, 16, 16)  # no card, no map size
    g = torch.Generator().manual_seed(0)
    given = pipe(pose=kp, size=(16, 16), output_type="tensor", generator=g)
    again = pipe(pose=kp, output_type="tensor", generator=torch.Generator().manual_seed(0))
    assert torch.equal(given, again)


def test_pipeline_refuses_a_spatial_slot_that_is_not_the_window_size():
    # block_size 16: a 4x4 code window, so a spatial condition emits 16 tokens per window
    with pytest.raises(
        SpecError,
        match=r"conditioner 'depth' \(depth\) emits one token per code, 16 for the prior's "
        r"4x4 code window, but the prior's slot for it expects 12: set "
        r"prior.conditions.depth.num_tokens = 16",
    ):
        _pipe({"depth": {"type": "depth"}}, {"depth": {"vocab_size": 16, "num_tokens": 12}})
    _pipe({"depth": {"type": "depth"}}, {"depth": {"vocab_size": 16, "num_tokens": 16}})


def _grey(path, size, value=0):
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    "replace,message",
    [
        ({"segmentation": ("bad.png", (16, 16), 9)}, "class id 9, outside [0, 7)"),
        ({"segmentation": ("big.png", (32, 32), 1)}, "segmentation map is 32x32 pixels but the"),
        ({"pose": [[0.5, 0.5, 1.0]] * 4}, "has 4 keypoints but this conditioner takes 5"),
        ({"pose": [[0.5, 0.5, 1.0]] * 4 + [[1.5, 0.2, 1.0]]}, "keypoint 4 of pose 0 is at (1.5"),
        ({"edges": ("e12.png", (12, 12), 0)}, "the edge map is 12x12 pixels but the requested"),
        ({"low_resolution": ("s6.png", (6, 6), 0)}, "low-resolution image is 6x6 pixels but"),
        ({"label": 3}, "conditions do not match this pipeline (unknown ['label']"),
    ],
    ids=["seg-class", "seg-size", "pose-missing", "pose-range", "edges", "lowres", "undeclared"],
)
def test_cli_bad_spatial_input_names_the_fix_and_writes_nothing(tmp_path, replace, message):
    from click.testing import CliRunner

    from latentgen.cli import main

    conds = {
        "segmentation": {"type": "segmentation", "num_classes": 7},
        "pose": {"type": "pose", "num_keypoints": 5, "image_size": 16},
        "edges": {"type": "edges"},
        "low_resolution": {"type": "low_resolution", "factor": 2, "downsample": 2},
    }
    vocab = {"segmentation": 7, "pose": 6, "edges": 8, "low_resolution": 64}
    _pipe(
        conds, {n: {"vocab_size": v, "num_tokens": 16} for n, v in vocab.items()}
    ).save_pretrained(tmp_path / "p")
    files = {
        "segmentation": ("map.png", (16, 16), 1),
        "pose": [[0.5, 0.5, 1.0]] * 5,
        "edges": ("e.png", (16, 16), 0),
        "low_resolution": ("small.png", (8, 8), 0),
        **replace,
    }
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "s.png"
    args = ["sample", str(tmp_path / "p"), "-n", "1", "--size", "16", "-o", str(out)]
    for name, spec in files.items():
        if isinstance(spec, tuple):
            path = _grey(tmp_path / spec[0], spec[1], spec[2])
            if name == "low_resolution":  # an RGB image
                Image.open(path).convert("RGB").save(path)
        else:
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(spec))
        args += ["-c", f"{name}=@{path}"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert message in res.output
    assert not list((tmp_path / "out").iterdir())  # no image, no temp file left behind
