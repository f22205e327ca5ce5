"""Reading users' image files: every PNG pixel format, oversized images, binary config files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from latentgen import Pipeline, registry
from latentgen.cli import _read_condition_file, main
from latentgen.data.images import MAX_PIXELS_ENV, read_image
from latentgen.errors import DataError, InputError, SpecError

# PNG colour types (PNG spec, IHDR): grey, RGB, palette, grey+alpha, RGBA.
GREY, RGB, PALETTE, GREY_ALPHA, RGBA = 0, 2, 3, 4, 6
_CHANNELS = {GREY: 1, RGB: 3, PALETTE: 1, GREY_ALPHA: 2, RGBA: 4}


def write_png(
    path: Path, pixels: np.ndarray, color_type: int, depth: int = 8, palette: bytes = b""
) -> Path:
    """A minimal PNG writer (filter 0, one IDAT), so 16-bit colour files are real PNGs.

    Pillow cannot write 16-bit RGB(A) or grey+alpha; ``pixels`` is ``[H, W, C]`` (or
    ``[H, W]``) of the sample values, already packed to bytes for ``depth=1``.
    """
    h, w = pixels.shape[:2]
    raw = pixels.astype(">u2" if depth == 16 else "u1").reshape(h, -1)
    rows = b"".join(b"\x00" + row.tobytes() for row in raw)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    width = w * 8 if depth == 1 else w  # depth 1: pixels holds packed bytes
    ihdr = struct.pack(">IIBBBBB", width, h, depth, color_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + (chunk(b"PLTE", palette) if palette else b"")
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


_RNG = np.random.default_rng(0)
_GREY8 = _RNG.integers(0, 256, (6, 8))
_GREY16 = _RNG.integers(0, 65536, (6, 8))
_RGB8 = _RNG.integers(0, 256, (6, 8, 3))
_RGB16 = _RNG.integers(0, 65536, (6, 8, 3))
_ALPHA = _RNG.integers(0, 256, (6, 8, 1))
_ALPHA16 = _RNG.integers(0, 65536, (6, 8, 1))
_BITS = _RNG.integers(0, 256, (6, 1))  # 8 one-bit pixels per byte
_PAL = _RNG.integers(0, 256, (4, 3))
_INDEX = _RNG.integers(0, 4, (6, 8))


def _unpack_bits(packed: np.ndarray) -> np.ndarray:
    return np.unpackbits(packed.astype(np.uint8), axis=1) * 255  # [H, 8] of 0 / 255


# name -> (file pixels, colour type, depth, palette, the 8-bit RGB a user expects)
CASES = {
    "1-bit": (_BITS, GREY, 1, b"", np.repeat(_unpack_bits(_BITS)[..., None], 3, -1)),
    "L": (_GREY8, GREY, 8, b"", np.repeat(_GREY8[..., None], 3, -1)),
    "I;16": (_GREY16, GREY, 16, b"", np.repeat((_GREY16 >> 8)[..., None], 3, -1)),
    "LA": (np.concatenate([_GREY8[..., None], _ALPHA], -1), GREY_ALPHA, 8, b"",
           np.repeat(_GREY8[..., None], 3, -1)),
    "LA 16-bit": (np.concatenate([_GREY16[..., None], _ALPHA16], -1), GREY_ALPHA, 16, b"",
                  np.repeat((_GREY16 >> 8)[..., None], 3, -1)),
    "RGB": (_RGB8, RGB, 8, b"", _RGB8),
    "RGBA": (np.concatenate([_RGB8, _ALPHA], -1), RGBA, 8, b"", _RGB8),
    "RGB 16-bit": (_RGB16, RGB, 16, b"", _RGB16 >> 8),
    "RGBA 16-bit": (np.concatenate([_RGB16, _ALPHA16], -1), RGBA, 16, b"", _RGB16 >> 8),
    "palette": (_INDEX, PALETTE, 8, _PAL.astype(np.uint8).tobytes(), _PAL[_INDEX]),
}  # fmt: skip


def _file(tmp_path: Path, name: str) -> tuple[Path, np.ndarray]:
    pixels, ctype, depth, palette, want = CASES[name]
    path = write_png(tmp_path / f"{name.replace(' ', '_').replace(';', '')}.png", pixels, ctype,
                     depth, palette)  # fmt: skip
    return path, want.astype(np.uint8)


@pytest.mark.parametrize("name", list(CASES))
def test_every_png_format_reads_as_its_8bit_rgb(tmp_path: Path, name: str) -> None:
    path, want = _file(tmp_path, name)
    got = read_image(path, "RGB")
    assert got.mode == "RGB" and got.size == (want.shape[1], want.shape[0])
    assert np.array_equal(np.asarray(got), want)


@pytest.mark.parametrize("name", ["1-bit", "L", "I;16", "LA", "LA 16-bit"])
def test_grey_formats_read_as_their_8bit_grey(tmp_path: Path, name: str) -> None:
    path, want = _file(tmp_path, name)
    got = read_image(path, "L")
    assert got.mode == "L" and np.array_equal(np.asarray(got), want[..., 0])


def test_16bit_grey_folder_is_not_white(tmp_path: Path) -> None:
    # The reported case: a 16-bit greyscale PNG came out solid white (PSNR 5 dB).
    ramp = np.tile(np.linspace(0, 65535, 16).round().astype(np.int64), (16, 1))  # [16, 16]
    write_png(tmp_path / "depth16.png", ramp, GREY, 16)
    for channels in (1, 3):
        ds = registry.build(
            "dataset",
            {"type": "image_folder", "root": str(tmp_path), "image_size": 16, "channels": channels},
        )
        x = ds[0]["image"]  # [C, 16, 16] in [-1, 1]
        want = torch.from_numpy((ramp >> 8).astype(np.float32) / 127.5 - 1.0)
        assert x.shape == (channels, 16, 16)
        assert torch.allclose(x, want.expand_as(x), atol=1e-6)


def test_condition_files_keep_what_was_decoded(tmp_path: Path) -> None:
    # A palette segmentation map keeps its class indices; a 16-bit depth map its 16 bits.
    seg, _ = _file(tmp_path, "palette")
    got = _read_condition_file(seg)
    assert got.mode == "P" and np.array_equal(np.asarray(got), _INDEX)
    depth, _ = _file(tmp_path, "I;16")
    got = _read_condition_file(depth)
    assert got.mode.startswith("I;16") and np.array_equal(np.asarray(got), _GREY16)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
            "prior": {"type": "toy.ngram", "vocab_size": 8},
        }
    )
    p.tokenizer.fit(torch.rand(4, 3, 16, 16) * 2 - 1)
    path = tmp_path_factory.mktemp("pipe") / "p"
    p.save_pretrained(path, card={"image_size": 16})
    return path


def test_reconstruct_reads_16bit_like_its_8bit_twin(saved_pipeline: Path, tmp_path: Path) -> None:
    k = np.tile(np.arange(0, 256, 16), (16, 1))  # [16, 16] grey levels
    write_png(tmp_path / "eight.png", k, GREY, 8)
    write_png(tmp_path / "sixteen.png", k * 257, GREY, 16)  # the same levels in 16 bits
    out = tmp_path / "recon"
    res = CliRunner().invoke(
        main,
        ["reconstruct", str(saved_pipeline), str(tmp_path / "eight.png"),
         str(tmp_path / "sixteen.png"), "-o", str(out), "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    a = np.asarray(Image.open(out / "eight.png"))
    b = np.asarray(Image.open(out / "sixteen.png"))
    assert np.array_equal(a, b)
    psnrs = [line.rsplit("PSNR", 1)[1] for line in res.output.splitlines() if "PSNR" in line]
    assert len(psnrs) == 2 and psnrs[0] == psnrs[1]


# -- decompression bombs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 20000x20000 1-bit PNG of zeros: 400 Mpx that compress to ~50 kB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    return write_png(path, np.zeros((20000, 2500), np.uint8), GREY, 1)


def test_bomb_is_refused_with_the_limit_and_the_fix(bomb: Path) -> None:
    with pytest.raises(DataError) as err:
        read_image(bomb, "RGB")
    msg = str(err.value)
    assert str(bomb) in msg and "20000x20000 = 400,000,000 pixels" in msg
    assert "178,956,970" in msg and f"{MAX_PIXELS_ENV}=400000000" in msg


def test_bomb_in_a_folder_and_on_the_command_line(bomb: Path, saved_pipeline: Path) -> None:
    ds = registry.build("dataset", {"type": "image_folder", "root": str(bomb.parent)})
    with pytest.raises(DataError, match=f"bomb.png is 20000x20000.*{MAX_PIXELS_ENV}"):
        ds[0]
    for args in (
        ["reconstruct", str(saved_pipeline), str(bomb), "--device", "cpu"],
        ["sample", str(saved_pipeline), "-c", f"x=@{bomb}"],
    ):
        res = CliRunner().invoke(main, args)
        assert res.exit_code != 0 and res.exception is not None
        assert isinstance(res.exception, SystemExit), res.exception  # no traceback
        assert "20000x20000" in res.output and MAX_PIXELS_ENV in res.output, res.output


def test_pixel_limit_is_set_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, want = _file(tmp_path, "RGB")  # 6x8 = 48 pixels
    monkeypatch.setenv(MAX_PIXELS_ENV, "47")
    with pytest.raises(DataError, match="48 pixels, above the limit of 47"):
        read_image(path, "RGB")
    monkeypatch.setenv(MAX_PIXELS_ENV, "48")
    assert np.array_equal(np.asarray(read_image(path, "RGB")), want)
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")  # no limit
    assert read_image(path, "RGB").size == (8, 6)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(InputError, match=f"{MAX_PIXELS_ENV}='lots' is not a whole number"):
        read_image(path, "RGB")
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own global is left as it was


# -- binary files where a config is expected ------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["train", "tokenizer", "--config", "{bin}"], "train config"),
        (["train", "prior", "--config", "{bin}"], "train config"),
        (["eval", "tokenizer", "{pipe}", "--data", "{bin}"], "dataset config"),
        (["eval", "prior", "{pipe}", "--data", "{bin}"], "dataset config"),
    ],
)
def test_binary_config_file_is_named(
    tmp_path: Path, saved_pipeline: Path, argv: list[str], what: str
) -> None:
    binary = tmp_path / "photo.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    args = [a.format(bin=binary, pipe=saved_pipeline) for a in argv]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
    assert f"{what} file {binary} is not a text file" in res.output
    assert "byte 0x89 at offset 0" in res.output


def test_binary_spec_file_from_python(tmp_path: Path) -> None:
    from latentgen.specs import load_spec

    binary = tmp_path / "spec.json"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(SpecError, match="spec file .*spec.json is not a text file"):
        load_spec(binary)
