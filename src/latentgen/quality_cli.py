"""``latentgen eval samples`` and ``latentgen compare``: sample quality on the command line.

    latentgen eval samples runs/shapes-transformer/final --classifier runs/shapes-classifier \\
        --data held_out.yaml -n 50 --reject 0.25 --reject 0.05
    latentgen compare --config src/latentgen/configs/compare-shapes-table1.yaml
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from latentgen.training.cli import (
    _CONFIG,
    _dataset_from_file,
    _device,
    condition_key_map,
    eval_group,
)

__all__ = ["add_commands"]


def add_commands(group: click.Group) -> None:
    """Attach ``eval samples`` (to the ``eval`` group) and ``compare`` to ``group``."""
    eval_group.add_command(eval_samples)
    group.add_command(compare)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from latentgen.files import atomic_write_bytes

    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode())


@click.command("samples")
@click.argument("pipeline_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--classifier",
    "classifier_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Saved classifier (latentgen train classifier): accuracy, and its features for KID/FID.",
)
@click.option(
    "--data",
    "data_path",
    required=True,
    type=_CONFIG,
    help="Held-out dataset config (or a train config with `data:`): the real images of KID/FID "
    "and the conditions of spatial pipelines.",
)
@click.option(
    "--num",
    "-n",
    default=100,
    show_default=True,
    type=click.IntRange(1),
    help="Samples per class (class-conditional pipelines), else samples in all.",
)
@click.option(
    "--reject",
    "acceptances",
    multiple=True,
    type=float,
    help="Also evaluate classifier rejection sampling at this acceptance rate, in (0, 1] "
    "(repeatable: one row per rate, e.g. --reject 0.25 --reject 0.05).",
)
@click.option(
    "--reject-classifier",
    "reject_classifier_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Saved classifier that ranks the rejection candidates (default: --classifier). "
    "One that both chooses and scores the samples favours its own choice.",
)
@click.option(
    "--condition",
    "conditions",
    multiple=True,
    metavar="NAME",
    help="Draw from these of the pipeline's conditions only (repeatable; default: all). The "
    "others are left out (the prior's null), e.g. --condition label for a label-and-map "
    "pipeline from the label alone.",
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    type=click.Choice(["accuracy", "kid", "fid", "agreement"]),
    help="Only these measures (repeatable; default: every one that applies).",
)
@click.option("--kid-subset-size", default=100, show_default=True, type=click.IntRange(2))
@click.option("--kid-subsets", default=100, show_default=True, type=click.IntRange(1))
@click.option(
    "--inception",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also Inception-v3 FID and IS with these weights (NVIDIA's TorchScript "
    "inception-2015-12-05.pt; latentgen never downloads them).",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    metavar="NAME=KEY",
    help="Dataset key of a conditioner's data (default: its name).",
)
@click.option(
    "--steps",
    default=None,
    type=click.IntRange(1),
    help="Decoding passes T of a masked prior (default: the pipeline's sampler's).",
)
@click.option(
    "--refine",
    default=None,
    type=click.IntRange(0),
    help="Refinement passes of a masked prior after its T passes (default: the pipeline's "
    "sampler's; see `latentgen sample --refine`).",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option(
    "--jsonl",
    "jsonl_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the rows as JSON lines to this file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of the table.")
def eval_samples(
    pipeline_dir: Path,
    classifier_dir: Path,
    data_path: Path,
    num: int,
    acceptances: tuple[float, ...],
    reject_classifier_dir: Path | None,
    conditions: tuple[str, ...],
    metrics: tuple[str, ...],
    kid_subset_size: int,
    kid_subsets: int,
    inception: Path | None,
    keys: tuple[str, ...],
    steps: int | None,
    refine: int | None,
    batch_size: int,
    seed: int,
    device: str,
    jsonl_path: Path | None,
    as_json: bool,
) -> None:
    """Class accuracy, KID/FID and condition agreement of PIPELINE_DIR's samples."""
    from latentgen.pipeline import Pipeline
    from latentgen.rejection import RejectionConfig
    from latentgen.sample_eval import evaluate_samples, format_table

    for rate in acceptances:
        RejectionConfig(classifier=lambda x: x, acceptance_rate=rate)  # checks the rate
    if reject_classifier_dir is not None and not acceptances:
        raise click.UsageError(
            "--reject-classifier ranks the candidates of rejection sampling: give the rate too, "
            "e.g. --reject 0.05."
        )
    pipe = Pipeline.from_pretrained(pipeline_dir).to(_device(device))
    mapping = condition_key_map(pipe.conditioners, keys)
    given = {"steps": steps, "refine_steps": refine}
    sampler = pipe.sampler.model_copy(update={k: v for k, v in given.items() if v is not None})
    rows = evaluate_samples(
        pipe,
        classifier_dir,
        _dataset_from_file(data_path),
        num_samples=num,
        rejection=list(acceptances) or None,
        rejection_classifier=reject_classifier_dir,
        conditions=list(conditions) or None,
        metrics=metrics or None,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        inception=inception,
        batch_size=batch_size,
        sampler=sampler,
        condition_keys=mapping,
        seed=seed,
    )
    dicts = [r.as_dict() for r in rows]
    if jsonl_path is not None:
        _write_jsonl(jsonl_path, dicts)
    if as_json:
        for d in dicts:
            click.echo(json.dumps(d))
        return
    # The per-class accuracies get a table of their own: one column per class.
    per = "class_accuracy/"
    columns = [k for k in dict.fromkeys(k for d in dicts for k in d) if not k.startswith(per)]
    click.echo(format_table(dicts, columns))
    by_class = [
        {"name": d["name"], **{k[len(per) :]: v for k, v in d.items() if k.startswith(per)}}
        for d in dicts
    ]
    if any(len(r) > 1 for r in by_class):
        click.echo("\nclass accuracy by class:")
        click.echo(format_table(by_class))
    for note in dict.fromkeys(n for r in rows for n in r.notes):
        click.echo(f"note: {note}", err=True)


@click.command()
@click.option(
    "--config",
    "-c",
    "config_path",
    required=True,
    type=_CONFIG,
    help="Compare config (YAML/JSON): tokenizer_path, data, held_out, priors, budgets, trainer.",
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of the table.")
def compare(config_path: Path, device: str, as_json: bool) -> None:
    """Train several priors on the same codes with the same budget; one table + learning curves."""
    import sys

    from latentgen.compare import load_compare_config, run_compare

    result = run_compare(
        load_compare_config(config_path), device=_device(device), progress=sys.stderr.isatty()
    )
    if as_json:
        for row in result.rows:
            click.echo(json.dumps(row))
    else:
        click.echo(result.table())
    click.echo(f"wrote {result.jsonl} and {result.curves_png}", err=as_json)
