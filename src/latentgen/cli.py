"""The ``latentgen`` command line: plugins, schema, sample, serve, demo, training commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from latentgen.errors import InputError, LatentgenError
from latentgen.version import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns latentgen's own errors into one clean line and exit code 1 (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LatentgenError as e:
            raise click.ClickException(str(e)) from None
        except ValidationError as e:  # a bad option value that a pydantic model refused
            from latentgen.specs import validation_problems

            lines = [f"{loc}: {msg}" if loc else msg for loc, msg, _ in validation_problems(e)]
            raise click.ClickException("invalid value: " + "; ".join(lines)) from None


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="latentgen")
def main() -> None:
    """latentgen: two-stage image generation built from plugins."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--hook", default=None, help="Only plugins implementing this hook.")
def plugins(as_json: bool, hook: str | None) -> None:
    """List every plugin, its version and components, and plugins that failed to load."""
    from latentgen.plugins import format_plugin_rows, plugin_rows

    rows = plugin_rows(hook)
    click.echo(json.dumps(rows, indent=2) if as_json else format_plugin_rows(rows))


@main.command()
@click.argument("kind", required=False)
def schema(kind: str | None) -> None:
    """Print the JSON Schema of installed component configs (one KIND, or the whole spec)."""
    from latentgen.schema import kind_schema, pipeline_schema

    click.echo(json.dumps(kind_schema(kind) if kind else pipeline_schema(), indent=2))


def _parse_condition(value: str) -> Any:
    """A CLI condition value (``latentgen.condition_args.parse_condition``), errors as --cond's."""
    from latentgen.condition_args import parse_condition

    try:
        return parse_condition(value)
    except InputError as e:
        raise click.BadParameter(str(e), param_hint="--cond") from None


def _read_condition_file(path: Path) -> Any:
    from latentgen.condition_args import read_condition_file

    try:
        return read_condition_file(path)
    except InputError as e:
        raise click.BadParameter(str(e), param_hint="--cond") from None


def _parse_size(value: str | None) -> tuple[int, int] | None:
    """``"N"`` or ``"HxW"`` (pixels) -> ``(H, W)``."""
    if value is None:
        return None
    parts = value.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        h = w = 0
    if len(parts) > 2 or h < 1 or w < 1:
        raise click.BadParameter(
            f"{value!r}: give a size in pixels as N or HxW, e.g. 512 or 1024x768.",
            param_hint="--size",
        )
    return h, w


@main.command()
@click.argument("pipeline_dir", type=click.Path(path_type=Path))
@click.option(
    "--num",
    "-n",
    default=8,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Number of images.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option(
    "--out",
    "-o",
    default="samples.png",
    show_default=True,
    type=click.Path(path_type=Path),
    help="PNG grid to write.",
)
@click.option(
    "--size",
    default=None,
    callback=lambda _ctx, _param, value: _parse_size(value),
    help="Image size in pixels: N (square) or HxW, e.g. 1024x768 (default: the card's). A "
    "size beyond the prior's trained window is drawn with the sliding window.",
)
@click.option(
    "--cond",
    "-c",
    multiple=True,
    metavar="NAME=VALUE",
    help="A condition, e.g. -c label=3, -c 'label=[3,7]' or -c label=@labels.txt "
    "(.json, .npy, one value per line, or an image). Repeatable.",
)
@click.option("--temperature", default=None, type=float)
@click.option("--top-k", default=None, type=int)
@click.option("--top-p", default=None, type=float)
@click.option("--guidance", default=None, type=float, help="Classifier-free guidance scale.")
@click.option(
    "--window",
    default=None,
    type=click.Choice(["exact", "cached"]),
    help="Sliding window for sizes beyond the prior's trained window: 'cached' (fast, the "
    "default) moves it in strides and reuses the KV cache; 'exact' runs one window forward per "
    "code (the reference).",
)
@click.option(
    "--window-band",
    default=None,
    type=click.Choice(["bottom", "middle"]),
    help="With --window cached: a band of rows in its window's middle (as exact centres it; "
    "the default) or at its bottom (the most rows above each code).",
)
@click.option(
    "--tile-mode",
    default="blend",
    show_default=True,
    type=click.Choice(["blend", "exact"]),
    help="Decoding of an image larger than a tile (32x32 codes): 'blend' cross-fades tiles "
    "decoded alone; 'exact' gives the whole decode's result (VQ-VAE / VQGAN tokenizers) at "
    "several decodes' time, memory still bounded by the tile.",
)
@click.option(
    "--steps",
    default=None,
    type=int,
    help="Decoding passes T of a masked prior (default: its config's steps, usually 12); "
    "fewer is faster, more is closer to one code per pass. Autoregressive priors ignore it.",
)
@click.option(
    "--refine",
    default=None,
    type=click.IntRange(0),
    help="Refinement passes of a masked prior after its T passes: each re-masks the codes the "
    "prior finds least likely given the rest and draws them again (3 passes each). "
    "Autoregressive priors ignore it.",
)
@click.option("--nrow", default=None, type=click.IntRange(1), help="Images per grid row.")
@click.option(
    "--reject",
    "reject_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Classifier rejection sampling with this saved classifier: keep the candidates it "
    "scores highest for the requested class (needs a class condition).",
)
@click.option(
    "--acceptance",
    default=None,
    type=float,
    help="With --reject: fraction of candidates kept, in (0, 1] (default 0.05, the paper's).",
)
def sample(
    pipeline_dir: Path,
    num: int,
    seed: int,
    out: Path,
    size: tuple[int, int] | None,
    cond: tuple[str, ...],
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    guidance: float | None,
    window: str | None,
    window_band: str | None,
    tile_mode: str,
    steps: int | None,
    refine: int | None,
    nrow: int | None,
    reject_dir: Path | None,
    acceptance: float | None,
) -> None:
    """Sample NUM images from a saved pipeline and write them as one PNG grid."""
    import torch

    from latentgen.pipeline import Pipeline
    from latentgen.rejection import RejectionConfig
    from latentgen.specs import SamplerConfig
    from latentgen.utils import image_grid

    if acceptance is not None and reject_dir is None:
        raise click.BadParameter(
            "--acceptance sets the rate of rejection sampling: give the classifier with "
            "--reject DIR too.",
            param_hint="--acceptance",
        )
    rejection = None
    if reject_dir is not None:
        rejection = RejectionConfig(
            classifier=reject_dir, acceptance_rate=0.05 if acceptance is None else acceptance
        )
    pipe = Pipeline.from_pretrained(pipeline_dir, rejection=rejection)
    conditions = {}
    for item in cond:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(
                f"{item!r}: write NAME=VALUE, e.g. label=3", param_hint="--cond"
            )
        conditions[name] = _parse_condition(value)
    overrides = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "guidance_scale": guidance,
        "window": window,
        "window_band": window_band,
        "steps": steps,
        "refine_steps": refine,
    }
    sampler = SamplerConfig(
        **{**pipe.sampler.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    )
    images = pipe(
        num,
        size=size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        progress=True,
        tile_mode="exact" if tile_mode == "exact" else "blend",
        **conditions,
    )
    image_grid(images, nrow=nrow).save(_png_path(out))
    click.echo(f"wrote {len(images)} images to {out}")
    report = pipe.last_rejection
    if report is not None:
        click.echo(
            f"rejection sampling: kept {report.kept} of {report.candidates} candidates "
            f"(realised rate {report.realised_rate:.4g}, requested {report.requested_rate:.4g}); "
            f"mean classifier probability of the requested class {report.mean_prob_kept:.3f} "
            f"kept vs {report.mean_prob_all:.3f} over all candidates"
        )


@main.command()
@click.option("--out", "-o", default="out/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--toy",
    is_flag=True,
    help="Use the latentgen-toy plugin's counting models instead (seconds, not minutes).",
)
@click.option(
    "--classifier",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Classifier that scores the samples (default: the shipped shapes classifier).",
)
@click.option(
    "--acceptance",
    type=float,
    default=0.25,
    show_default=True,
    help="Rejection sampling keeps this share of the candidates, ranked by a second shipped "
    "classifier (samples-rejection.png); 1 draws no rejection-sampled images.",
)
def demo(out: Path, seed: int, toy: bool, classifier: Path | None, acceptance: float) -> None:
    """Train a VQGAN and one prior on the built-in shapes data; measure it; write images."""
    from latentgen.demo import run_demo, run_toy_demo

    if toy:
        run_toy_demo(out, seed=seed)
    else:
        run_demo(out, seed=seed, classifier=classifier, acceptance_rate=acceptance)


@main.command()
@click.argument("pipeline_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--out",
    "-o",
    default="out/serve",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Output folder: every run, upload and Gradio cache file goes here, nowhere else.",
)
@click.option(
    "--max-pixels",
    default=4 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(1),
    help="Largest request (images x height x width): bigger ones get an error in the page.",
)
def serve(pipeline_dir: Path, host: str, port: int, out: Path, max_pixels: int) -> None:
    """Serve a web page to generate from PIPELINE_DIR and inspect its tokenizer (Gradio)."""
    from latentgen.serve.app import launch
    from latentgen.serve.session import Studio

    studio = Studio(pipeline_dir, out, max_pixels=max_pixels)
    click.echo(f"serving {pipeline_dir} on http://{host}:{port} (outputs in {studio.out_dir})")
    launch(studio, host=host, port=port)


@main.command("new-plugin")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    default=None,
    type=click.Path(path_type=Path),
    help="Where to write the package (default: ./latentgen-NAME). Must not exist.",
)
def new_plugin(name: str, directory: Path | None) -> None:
    """Write a plugin package NAME with one component of each kind, its tests and CI."""
    from latentgen.scaffold import new_plugin as write
    from latentgen.scaffold import plugin_names

    target = write(name, directory)
    names = plugin_names(name)
    click.echo(f"wrote {names.dist} (module {names.module}, types '{names.name}.*') to {target}")
    click.echo(
        f'test it: cd {target} && LATENTGEN_LOAD_PLUGINS="" PYTHONPATH=src python -m pytest; '
        'install it: pip install -e ".[test]"'
    )


def _png_path(out: Path) -> Path:
    if out.suffix.lower() != ".png":
        raise click.BadParameter(f"{out}: the output must be a .png file", param_hint="--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _add_training_commands() -> None:
    """``train``, ``reconstruct`` and ``eval`` live with the training engine."""
    from latentgen.convert import convert
    from latentgen.quality_cli import add_commands as add_quality_commands
    from latentgen.training.cli import add_commands

    add_commands(main)
    add_quality_commands(main)
    main.add_command(convert)


_add_training_commands()
