"""Tiled decoding: tile placement, seam blending, the Pipeline hook and bad tile settings."""

from __future__ import annotations

import itertools
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentgen import ComponentConfig, Pipeline, Tokenizer, registry
from latentgen.errors import InputError
from latentgen.tokenizers.tiling import decode_tiled, needs_tiling, tile_starts, tiled_difference


class LocalConfig(ComponentConfig):
    type: Literal["test.local"] = "test.local"


class LocalTokenizer(Tokenizer):
    """Decodes through two 3x3 convs: each pixel depends on codes within 2 pixels of it."""

    Config = LocalConfig

    def __init__(self, config: LocalConfig | None = None) -> None:
        super().__init__(config or LocalConfig())
        torch.manual_seed(0)
        self.emb = nn.Embedding(8, 4)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)
        self.calls: list[tuple[int, int]] = []

    vocab_size = 8  # type: ignore[assignment]
    downsample = 4  # type: ignore[assignment]
    in_channels = 3  # type: ignore[assignment]

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        self.calls.append((int(codes.shape[1]), int(codes.shape[2])))
        x = self.emb(codes).permute(0, 3, 1, 2)  # [B, 4, h, w]
        x = F.interpolate(x, scale_factor=self.downsample, mode="nearest")
        return self.conv2(torch.relu(self.conv1(x)))  # [B, 3, h*f, w*f]


@pytest.mark.parametrize("n,tile,overlap", [(16, 16, 4), (17, 16, 4), (40, 16, 4), (64, 32, 8)])
def test_tiles_cover_the_side_evenly_with_at_least_the_overlap(n, tile, overlap):
    starts = tile_starts(n, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, n) == n
    shared = [a + tile - b for a, b in itertools.pairwise(starts)]
    assert all(s >= overlap for s in shared)
    assert max(shared, default=0) - min(shared, default=0) <= 1  # evenly spread
    # no fewer tiles could do it
    assert len(starts) == 1 or (len(starts) - 2) * (tile - overlap) + tile < n


@pytest.mark.parametrize(
    "grid,tile,overlap", [((20, 20), 8, 4), ((9, 30), 8, 4), ((24, 17), 12, 6)]
)
def test_a_local_decoder_decodes_identically_tiled_and_whole(grid, tile, overlap):
    # The blend gives no weight to the outer quarter of each seam (here >= 4 pixels), and the
    # decoder sees 2 pixels around a pixel: the tile borders' zero padding never shows.
    tok = LocalTokenizer()
    codes = torch.randint(0, 8, (2, *grid), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = tok.decode(codes)
        tok.calls.clear()
        tiled = decode_tiled(tok, codes, tile, overlap)
    assert tiled.shape == whole.shape
    assert float((tiled - whole).abs().max()) < 1e-5
    assert len(tok.calls) > 1
    assert all(h <= tile and w <= tile for h, w in tok.calls)  # memory follows the tile


def test_seams_without_blending_would_show():
    # A too-narrow overlap puts weight on pixels that saw the tile's zero padding: the check
    # above can fail, and tiled_difference reports it.
    tok = LocalTokenizer()
    codes = torch.randint(0, 8, (1, 24, 24), generator=torch.Generator().manual_seed(2))
    assert tile_starts(24, 8, 0) == [0, 8, 16]  # tiles meet edge to edge
    assert tiled_difference(tok, codes, tile=8, overlap=0) > 1e-3
    assert tiled_difference(tok, codes, tile=8, overlap=4) < 1e-5


def test_vqgan_decodes_tile_by_tile_and_reports_the_difference():
    tok = registry.build(
        "tokenizer",
        {
            "type": "vqgan",
            "ch": 8,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "z_channels": 8,
            "resolution": 16,
            "quantizer": {"type": "vq", "codebook_size": 16, "dim": 4},
            "perceptual_weight": 0.0,
        },
    ).eval()
    codes = torch.randint(0, 16, (1, 20, 12), generator=torch.Generator().manual_seed(0))
    seen: list[tuple[int, ...]] = []
    decode = tok.decode

    def spy(c: Tensor) -> Tensor:
        seen.append(tuple(c.shape))
        return decode(c)

    tok.decode = spy  # type: ignore[method-assign]
    with torch.no_grad():
        out = decode_tiled(tok, codes, tile=8, overlap=2)
    assert out.shape == (1, 3, 40, 24) and torch.isfinite(out).all()
    assert len(seen) == 3 * 2 and all(s[1] <= 8 and s[2] <= 8 for s in seen)
    diff = tiled_difference(tok, codes, tile=8, overlap=2)
    assert 0 < diff < float("inf")  # GroupNorm is per tile: close, not identical


def _pipeline() -> tuple[Pipeline, list[tuple[int, int]]]:
    """A pipeline whose (registered, local) tokenizer records the grid of every decode call."""
    pipe = Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
            "prior": {
                "type": "transformer",
                "vocab_size": 8,
                "block_size": 16,
                "n_layer": 1,
                "n_head": 1,
                "n_embd": 8,
            },
        }
    )
    calls: list[tuple[int, int]] = []
    decode = pipe.tokenizer.decode

    def spy(c: Tensor) -> Tensor:
        calls.append((int(c.shape[1]), int(c.shape[2])))
        return decode(c)

    pipe.tokenizer.decode = spy  # type: ignore[method-assign]
    return pipe, calls


def test_pipeline_decodes_large_grids_in_tiles_and_small_ones_whole():
    pipe, calls = _pipeline()
    big = torch.randint(0, 8, (1, 40, 36))
    out = pipe.decode(big)
    assert out.shape == (1, 3, 160, 144)
    assert needs_tiling((40, 36)) and len(calls) == 4 and max(max(c) for c in calls) == 32
    calls.clear()
    assert torch.allclose(pipe.decode(big, tiled=False), out, atol=1e-5)  # a local decoder
    assert calls == [(40, 36)]
    calls.clear()
    pipe.decode(torch.randint(0, 8, (1, 12, 12)))
    assert calls == [(12, 12)]
    calls.clear()
    pipe.decode(torch.randint(0, 8, (1, 12, 12)), tiled=True, tile=8, overlap=2)
    assert len(calls) == 4


def test_generation_at_a_large_size_decodes_in_tiles():
    pipe, calls = _pipeline()
    images = pipe(1, size=(4 * 36, 4 * 8), output_type="tensor", generator=torch.Generator())
    assert images.shape == (1, 3, 144, 32)
    assert len(calls) == 2 and all(h <= 32 for h, _ in calls)


@pytest.mark.parametrize(
    "tile,overlap,match",
    [
        (0, 0, "tile must be at least 1x1"),
        (8, 8, r"overlap must lie in \[0, 8\)"),
        ((8, 4), 4, r"overlap must lie in \[0, 4\)"),
        (8, -1, "overlap must lie"),
    ],
)
def test_bad_tile_settings_name_the_fix(tile, overlap, match):
    tok = LocalTokenizer()
    with pytest.raises(InputError, match=match):
        decode_tiled(tok, torch.zeros(1, 20, 20, dtype=torch.long), tile, overlap)


# -- exact mode: whole-image GroupNorm statistics and halos --------------------------------------
def _vqgan(attn_resolutions: list[int], ch_mult: list[int]) -> Tokenizer:
    torch.manual_seed(0)
    tok = registry.build(
        "tokenizer",
        {
            "type": "vqgan",
            "ch": 8,
            "ch_mult": ch_mult,
            "num_res_blocks": 1,
            "attn_resolutions": attn_resolutions,
            "z_channels": 8,
            "resolution": 32,
            "quantizer": {"type": "vq", "codebook_size": 16, "dim": 4},
            "perceptual_weight": 0.0,
        },
    ).eval()
    with torch.no_grad():  # away from the initialisation, so statistics differ across the image
        for p in tok.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return tok


@pytest.mark.parametrize(
    ("attn", "ch_mult", "tile"),
    [
        ([], [1, 2, 2], 8),  # f=4, attention in the middle block only
        ([8], [1, 2, 2], (6, 9)),  # attention at code resolution too, uneven tiles
        ([16], [1, 2, 2], 8),  # attention one level up: that level runs whole as well
    ],
)
def test_exact_tiles_decode_what_the_whole_decode_does(attn, ch_mult, tile):
    tok = _vqgan(attn, ch_mult)
    codes = torch.randint(0, 16, (2, 20, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = tok.decode(codes)
        exact = decode_tiled(tok, codes, tile=tile, mode="exact")
        blend = decode_tiled(tok, codes, tile=tile, overlap=2)
    assert exact.shape == whole.shape == (2, 3, 80, 68)
    torch.testing.assert_close(exact, whole, atol=1e-4, rtol=1e-4)
    assert (blend - whole).abs().max() > 1e-2  # per-tile statistics: what exact mode removes
    assert tiled_difference(tok, codes, tile=tile, mode="exact") < 1e-4


def test_exact_tiles_need_both_the_halo_and_the_shared_statistics(monkeypatch):
    from latentgen.tokenizers import tiling

    tok = _vqgan([], [1, 2, 2])
    codes = torch.randint(0, 16, (1, 20, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = tok.decode(codes)
        sizes: list[tuple[int, int]] = []
        tail = tiling._tail

        def spy(decoder, h, first, norm):  # type: ignore[no-untyped-def]
            sizes.append((int(h.shape[-2]), int(h.shape[-1])))
            return tail(decoder, h, first, norm)

        monkeypatch.setattr(tiling, "_tail", spy)
        decode_tiled(tok, codes, tile=8, mode="exact")
        halo = tiling._halo(tok.decoder, tiling._first_tiled_level(tok.decoder))  # type: ignore[arg-type]
        assert halo >= 1 and sizes  # memory: no tile runs more than its codes and two halos
        assert max(max(s) for s in sizes) <= 8 + 2 * halo
        monkeypatch.setattr(tiling, "_halo", lambda decoder, first: 0)
        no_halo = decode_tiled(tok, codes, tile=8, mode="exact")
    assert (no_halo - whole).abs().max() > 1e-3  # zero padding at the tile edges shows


def test_exact_tiling_needs_a_convolutional_decoder():
    with pytest.raises(InputError, match="exact tiled decoding needs the convolutional decoder"):
        decode_tiled(LocalTokenizer(), torch.zeros(1, 20, 20, dtype=torch.long), 8, mode="exact")
    with pytest.raises(InputError, match="'blend' or 'exact'"):
        decode_tiled(LocalTokenizer(), torch.zeros(1, 20, 20, dtype=torch.long), 8, mode="x")  # type: ignore[arg-type]


def test_pipeline_decodes_exactly_in_tiles_when_asked():
    from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig

    tok = _vqgan([], [1, 2, 2])
    prior = TransformerPrior(
        TransformerPriorConfig(vocab_size=16, block_size=16, n_layer=1, n_head=1, n_embd=8)
    )
    pipe = Pipeline(tok, prior)
    codes = torch.randint(0, 16, (1, 36, 20), generator=torch.Generator().manual_seed(3))
    whole = pipe.decode(codes, tiled=False)
    exact = pipe.decode(codes, tile=16, tile_mode="exact")  # 36 > 16: tiled
    torch.testing.assert_close(exact, whole, atol=1e-4, rtol=1e-4)
    assert (pipe.decode(codes, tile=16, overlap=4) - whole).abs().max() > 1e-2


def test_cli_samples_with_exact_tiles_and_refuses_them_without_a_conv_decoder(tmp_path):
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from latentgen.cli import main
    from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig
    from latentgen.utils import image_grid

    prior = TransformerPrior(
        TransformerPriorConfig(vocab_size=16, block_size=16, n_layer=1, n_head=1, n_embd=8)
    )
    Pipeline(_vqgan([], [1, 2, 2]), prior).save_pretrained(tmp_path / "vq", card={"image_size": 16})
    out = tmp_path / "exact.png"
    args = ["sample", str(tmp_path / "vq"), "-n", "1", "--size", "160x96", "--seed", "3"]
    res = CliRunner().invoke(main, [*args, "--tile-mode", "exact", "-o", str(out)])
    assert res.exit_code == 0, res.output
    pipe = Pipeline.from_pretrained(tmp_path / "vq")  # 40x24 codes: more than a 32-code tile
    codes = pipe.sample_codes(1, size=(160, 96), generator=torch.Generator().manual_seed(3))
    from latentgen.data.base import to_pil

    whole = image_grid(to_pil(pipe.decode(codes, tiled=False)))
    got = torch.from_numpy(np.asarray(Image.open(out), dtype=np.float32))
    want = torch.from_numpy(np.asarray(whole, dtype=np.float32))
    assert got.shape == want.shape and (got - want).abs().max() <= 1  # 8-bit rounding only

    palette = Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 16, "downsample": 4},
            "prior": {
                "type": "transformer",
                "vocab_size": 16,
                "block_size": 16,
                "n_layer": 1,
                "n_head": 1,
                "n_embd": 8,
            },
        }
    )
    palette.tokenizer.fit(torch.rand(4, 3, 16, 16) * 2 - 1)
    palette.save_pretrained(tmp_path / "pal", card={"image_size": 16})
    bad = tmp_path / "bad.png"
    args = ["sample", str(tmp_path / "pal"), "--size", "160x96", "--tile-mode", "exact"]
    res = CliRunner().invoke(main, [*args, "-o", str(bad)])
    assert res.exit_code != 0 and "exact tiled decoding needs the convolutional decoder" in (
        res.output + str(res.exception)
    )
    assert "--tile-mode blend" in res.output
    assert "sampling" not in res.output  # refused before the draw
    assert not bad.exists()
