"""Commands: ``latentgen train tokenizer|prior|classifier``, ``reconstruct``, ``eval``.

    latentgen train tokenizer --config vqgan.yaml            # stage 1 -> runs/NAME/final/
    latentgen train prior --config prior.yaml --resume       # stage 2 -> runs/NAME/final/ pipeline
    latentgen train classifier --config clf.yaml             # reference classifier, held-out acc.
    latentgen eval tokenizer runs/vqgan --data data.yaml     # PSNR, SSIM, LPIPS, codebook usage
    latentgen eval prior runs/prior/final --data data.yaml   # NLL in bits per code
    latentgen reconstruct runs/vqgan a.png b.png -o recon/

Several GPUs: ``torchrun --nproc-per-node 8 --no-python latentgen train prior --config ...``.
The lead's ``latentgen.cli`` calls ``add_commands(main)``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import click
import torch

from latentgen.errors import DataError, SpecError

__all__ = ["add_commands", "eval_group", "reconstruct", "train"]

_CONFIG = click.Path(exists=True, dir_okay=False, path_type=Path)
_SOURCE = click.Path(exists=True, file_okay=False, path_type=Path)


def add_commands(group: click.Group) -> None:
    """Attach ``train``, ``reconstruct`` and ``eval`` to the ``latentgen`` group."""
    group.add_command(train)
    group.add_command(reconstruct)
    group.add_command(eval_group)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA GPU is visible; use --device cpu", param_hint="--device")
    return torch.device(name)


def _load_mapping(path: Path, what: str = "dataset config") -> Any:
    from latentgen.utils import read_config_text

    text = read_config_text(path, what)
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as e:  # yaml.YAMLError / JSONDecodeError
        raise SpecError(f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from e


def _dataset_from_file(path: Path) -> Any:
    """A dataset from a YAML/JSON file holding a dataset config, or a train config's ``data``."""
    from latentgen import registry

    data = _load_mapping(path)
    if isinstance(data, Mapping) and "type" not in data and "data" in data:
        data = data["data"]
    if not isinstance(data, Mapping) or "type" not in data:
        raise SpecError(
            f"{path} must hold a dataset config ({{type: shapes, ...}}) or a train config with a "
            "`data:` section."
        )
    dataset = registry.build("dataset", data)
    if len(dataset) == 0:
        raise DataError(f"the dataset of {path} is empty.")
    return dataset


def _prepare_trainer(cfg: Any, run_dir: Path | None) -> Any:
    """The run's trainer options (``--run-dir`` applied), with the process-wide ones applied.

    Call it before building anything: ``flush_denormal`` reaches torch's CPU worker threads
    only if it is set before they start.
    """
    from latentgen.training.config import TrainerConfig
    from latentgen.training.loop import flush_denormals

    if run_dir is not None:
        data = cfg.model_dump()
        data.update(runs_dir=run_dir.parent, run_name=run_dir.name)
        cfg = TrainerConfig.model_validate(data)
    flush_denormals(cfg.flush_denormal)
    return cfg


def condition_key_map(conditioners: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, str]:
    """``--key NAME=KEY`` options as ``{condition: dataset key}``, checked against a pipeline."""
    mapping = {}
    for item in keys:
        name, sep, key = item.partition("=")
        if not sep or name not in conditioners:
            raise click.BadParameter(
                f"{item!r}: use NAME=KEY with NAME one of {sorted(conditioners) or 'none'}.",
                param_hint="--key",
            )
        mapping[name] = key
    return mapping


def _seed(seed: int) -> None:
    # Model weights are drawn before the trainer seeds its own streams: seed them too, so a
    # config file rebuilds the same initial model (rank 0's is broadcast to the others anyway).
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _save_train_config(run_dir: Path, cfg: Any, is_main: bool) -> None:
    if is_main:
        from latentgen.files import atomic_write_json

        atomic_write_json(run_dir / "train_config.json", cfg.model_dump(mode="json"))


def _report(result: Any) -> None:
    click.echo(f"trained to step {result.step} ({result.skipped_steps} step(s) skipped)")
    if result.checkpoint is not None:
        click.echo(f"last checkpoint: {result.checkpoint}")
    if result.export is not None:
        click.echo(f"exported: {result.export}")
    for k, v in result.metrics.items():
        if k not in ("step", "time") and isinstance(v, float):
            click.echo(f"  {k}: {v:.6g}")


def _allowed(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _command(stage: str, config_path: Path, run_dir: Path | None) -> str:
    """The command line that (re)starts this run, for messages that say how to continue it."""
    import os
    import shlex

    parts = ["latentgen", "train", stage, "--config", str(config_path)]
    if run_dir is not None:
        parts += ["--run-dir", str(run_dir)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: the same launcher again
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        nodes = ["--nnodes", str(world // local)] if world > local else []
        parts = ["torchrun", *nodes, "--nproc-per-node", str(local), "--no-python", *parts]
    return shlex.join(parts)


# -- train -----------------------------------------------------------------------------------------
def _run_options(config_help: str) -> Any:
    """``--config``, ``--resume``, ``--allow-change``, ``--run-dir``: shared by both ``train``."""

    def decorate(f: Any) -> Any:
        f = click.option(
            "--allow-change",
            "allow_change",
            default="",
            metavar="KEYS",
            help="With --resume: trainer options that may differ from the checkpoint's, comma "
            "separated (e.g. lr,grad_clip after the NaN guard stopped a run). Recorded in the "
            "run's trainer.json and metrics.jsonl.",
        )(f)
        f = click.option(
            "--run-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Write the run here instead of trainer.runs_dir/trainer.run_name.",
        )(f)
        f = click.option(
            "--resume", is_flag=True, help="Continue from the run's latest checkpoint."
        )(f)
        return click.option(
            "--config", "-c", "config_path", required=True, type=_CONFIG, help=config_help
        )(f)

    return decorate


@click.group()
def train() -> None:
    """Train a tokenizer (stage 1), a prior on its codes (stage 2), or a classifier."""


@train.command("tokenizer")
@_run_options("YAML/JSON with `tokenizer` (or `spec`), `data` and `trainer`.")
def train_tokenizer(
    config_path: Path, resume: bool, allow_change: str, run_dir: Path | None
) -> None:
    """Train a tokenizer; the result is written to RUN_DIR/final/ (tokenizer.json + weights)."""
    from latentgen import registry
    from latentgen.training.config import TokenizerTrainConfig, load_train_config
    from latentgen.training.distributed import init_distributed, shutdown_distributed
    from latentgen.training.loop import Trainer
    from latentgen.training.tasks import TokenizerTask

    cfg = load_train_config(config_path, TokenizerTrainConfig)
    tcfg = _prepare_trainer(cfg.trainer, run_dir)
    info = init_distributed(tcfg.device)
    try:
        _seed(tcfg.seed)
        tokenizer = registry.build("tokenizer", cfg.tokenizer_config)
        dataset = registry.build("dataset", cfg.data)
        n = min(cfg.grid_images, len(dataset))
        grid = torch.stack([dataset[i]["image"] for i in range(n)]) if n else None  # [n, C, H, W]
        task = TokenizerTask(tokenizer, grid_images=grid, disc_lr=cfg.disc_lr)
        _save_train_config(tcfg.run_dir, cfg, info.is_main)
        command = _command("tokenizer", config_path, run_dir)
        trainer = Trainer(task, dataset, tcfg, dist=info, command=command)
        result = trainer.fit(resume=resume, allow_change=_allowed(allow_change))
        if info.is_main:
            _report(result)
    finally:
        shutdown_distributed()


@train.command("prior")
@_run_options("YAML/JSON with `spec`, `tokenizer_path`, `data` and `trainer`.")
@click.option(
    "--rebuild-cache",
    is_flag=True,
    help="Encode the dataset again even if a code cache exists (e.g. a new tokenizer).",
)
@click.option(
    "--cache-only",
    is_flag=True,
    help="Build (or check) the code cache and stop, e.g. before a multi-GPU launch.",
)
def train_prior(
    config_path: Path,
    resume: bool,
    allow_change: str,
    run_dir: Path | None,
    rebuild_cache: bool,
    cache_only: bool,
) -> None:
    """Train a prior on cached codes; the result is a pipeline in RUN_DIR/final/."""
    from torch.utils.data import default_collate

    from latentgen import registry
    from latentgen.artifact import load_component
    from latentgen.data.code_cache import (
        open_or_build_code_cache,
        tokenizer_fingerprint,
    )
    from latentgen.pipeline import Pipeline
    from latentgen.training.distributed import init_distributed, shutdown_distributed
    from latentgen.training.loop import Trainer
    from latentgen.training.tasks import PriorTask

    cfg = _prior_train_config(config_path)
    tcfg = _prepare_trainer(cfg.trainer, run_dir)
    info = init_distributed(tcfg.device)
    try:
        tokenizer = load_component(cfg.tokenizer_path, "tokenizer")
        spec_tokenizer: Any = cfg.spec.tokenizer
        want = spec_tokenizer.model_dump(mode="json")
        have = tokenizer.config.model_dump(mode="json")
        if want != have:
            from latentgen.training.run_checkpoints import describe_differences

            raise SpecError(
                f"the spec's tokenizer config does not match the trained tokenizer in "
                f"{cfg.tokenizer_path}: {describe_differences(have, want)} (trained -> spec). "
                "Copy the trained tokenizer's config into spec.tokenizer."
            )
        tokenizer.to(info.device).eval()
        keys = cfg.cache_keys()
        cache_path = cfg.code_cache or tcfg.run_dir / "code_cache"
        fingerprint = tokenizer_fingerprint(tokenizer)
        if info.is_main:
            dataset = registry.build("dataset", cfg.data)
            cache = open_or_build_code_cache(
                tokenizer,
                dataset,
                cache_path,
                cfg.encode_batch_size,
                sorted(set(keys.values())),
                rebuild=rebuild_cache,
                device=info.device,
                num_workers=tcfg.num_workers,
                progress=sys.stderr.isatty(),
            )
        else:
            cache = _wait_for_cache(cache_path, fingerprint)
        if cache_only:
            if info.is_main:
                click.echo(f"code cache {cache_path}: {len(cache)} grids of {cache.grid}")
            return
        _seed(tcfg.seed)
        prior = registry.build("prior", _with_window(cfg.spec.prior, cache.grid))
        conds = {n: registry.build("conditioner", c) for n, c in cfg.spec.conditioners.items()}
        _load_cond_tokenizers(conds, cfg.cond_tokenizers)
        Pipeline(tokenizer, prior, conds, cfg.spec.sampler)  # checks that the parts fit together
        n = min(cfg.grid_samples, len(cache))
        task = PriorTask(
            prior,
            conds,
            tokenizer=tokenizer,
            condition_keys=keys,
            grid_batch=default_collate([cache[i] for i in range(n)]),
            data_fingerprint=cache.fingerprint,
            sampler=cfg.spec.sampler,
        )
        _save_train_config(tcfg.run_dir, cfg, info.is_main)
        command = _command("prior", config_path, run_dir)
        trainer = Trainer(task, cache, tcfg, dist=info, command=command)
        result = trainer.fit(resume=resume, allow_change=_allowed(allow_change))
        if info.is_main:
            _report(result)
    finally:
        shutdown_distributed()


def _with_window(prior: Any, grid: tuple[int, int]) -> Any:
    """The prior config with ``window`` set to the grid it trains on (priors that have one).

    The sliding window needs the grid a prior was trained on; ``block_size`` alone does not
    say its shape (64 codes may be 8x8 or 4x16), so training records it.
    """
    if "window" not in type(prior).model_fields:
        return prior
    h, w = grid
    if prior.window is None:
        return type(prior).model_validate({**prior.model_dump(), "window": (h, w)})
    if tuple(prior.window) != (h, w):
        raise SpecError(
            f"the prior's window is {prior.window[0]}x{prior.window[1]} but it trains on "
            f"{h}x{w} code grids (the data's image size / the tokenizer's downsample): the "
            f"window is the grid a prior is trained on; remove `window` from spec.prior or "
            f"set it to [{h}, {w}]."
        )
    return prior


@train.command("classifier")
@_run_options("YAML/JSON with `classifier`, `data` (labelled images), `held_out` and `trainer`.")
def train_classifier_command(
    config_path: Path, resume: bool, allow_change: str, run_dir: Path | None
) -> None:
    """Train a reference classifier; RUN_DIR/final/ records its held-out accuracy."""
    from latentgen.classifiers import load_classifier
    from latentgen.classifiers.training import ClassifierTrainConfig, train_classifier
    from latentgen.training.config import load_train_config

    cfg = load_train_config(config_path, ClassifierTrainConfig)
    tcfg = _prepare_trainer(cfg.trainer, run_dir)
    command = _command("classifier", config_path, run_dir)
    result, _ = train_classifier(
        cfg, tcfg, resume=resume, allow_change=_allowed(allow_change), command=command
    )
    _report(result)
    final = tcfg.run_dir / "final"
    if final.is_dir():
        clf = load_classifier(final)
        acc = clf.held_out_accuracy
        shown = "not measured" if acc is None else f"{acc:.2%}"
        click.echo(f"held-out accuracy: {shown} ({', '.join(clf.class_names)})")


def _prior_train_config(config_path: Path) -> Any:
    """The prior's train config, ``spec.tokenizer`` filled from ``tokenizer_path`` if left out."""
    from latentgen.artifact import find_component
    from latentgen.training.config import PriorTrainConfig, load_train_config

    data = _load_mapping(config_path, "train config")
    if isinstance(data, Mapping):
        spec, path = data.get("spec"), data.get("tokenizer_path")
        if isinstance(spec, Mapping) and "tokenizer" not in spec and isinstance(path, str):
            spec = {**spec, "tokenizer": find_component(path, "tokenizer").config}
            data = {**data, "spec": spec}
        cond_paths = data.get("cond_tokenizers")
        if isinstance(spec, Mapping) and isinstance(cond_paths, Mapping):
            # each named spatial conditioner takes its trained cond-stage tokenizer's config
            conds = dict(spec.get("conditioners") or {})
            for name, cpath in cond_paths.items():
                cond = conds.get(name)
                if isinstance(cond, Mapping) and cond.get("tokenizer") is None:
                    ref = find_component(str(cpath), "tokenizer")
                    conds[name] = {**cond, "tokenizer": ref.config}
            data = {**data, "spec": {**spec, "conditioners": conds}}
        return load_train_config(data, PriorTrainConfig, where=str(config_path))
    return load_train_config(config_path, PriorTrainConfig)


def _load_cond_tokenizers(conds: Mapping[str, Any], paths: Mapping[str, Path]) -> None:
    """Put each trained cond-stage tokenizer's weights into its spatial conditioner."""
    from latentgen.artifact import load_component
    from latentgen.conditioners.spatial import SpatialConditioner

    for name, path in paths.items():
        cond = conds[name]
        if not isinstance(cond, SpatialConditioner) or cond.tokenizer is None:
            raise SpecError(
                f"cond_tokenizers.{name} is given but conditioner '{name}' "
                f"({cond.config.type}) has no cond-stage tokenizer; only spatial conditioners "
                "with a `tokenizer` use one. Remove the entry, or set the conditioner's tokenizer."
            )
        trained = load_component(
            path,
            "tokenizer",
            config=cond.tokenizer.config,
            name=f"conditioners.{name}.tokenizer",
            config_source=f"spec.conditioners.{name}.tokenizer (leave it out to take the "
            "trained one's)",
        )
        cond.tokenizer.load_state_dict(trained.state_dict())


def _wait_for_cache(path: Path, fingerprint: str, poll_s: float = 5.0) -> Any:
    """Other ranks wait on the file system, not in a collective, while rank 0 encodes.

    Encoding a big dataset can outlast a collective's timeout (10 min for NCCL); if rank 0
    fails, torchrun stops the whole group, so this never waits for nothing.
    """
    import time

    from latentgen.data.code_cache import CACHE_FILE, CodeCache
    from latentgen.errors import CheckpointError

    while True:
        if (path / CACHE_FILE).is_file():
            try:
                return CodeCache(path, expect_fingerprint=fingerprint)
            except CheckpointError:
                pass  # a stale cache that rank 0 is about to replace
        time.sleep(poll_s)


# -- reconstruct -----------------------------------------------------------------------------------
@click.command()
@click.argument("source", type=_SOURCE)
@click.argument(
    "images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--out",
    "-o",
    default="recon",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the reconstructions (<name>.png each).",
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
def reconstruct(source: Path, images: tuple[Path, ...], out: Path, device: str) -> None:
    """Encode and decode IMAGES with the tokenizer of SOURCE (pipeline, export or run dir)."""
    from latentgen.artifact import load_component
    from latentgen.data.base import to_pil, to_tensor
    from latentgen.data.images import read_image
    from latentgen.metrics.image import psnr

    dev = _device(device)
    tok = load_component(source, "tokenizer").to(dev).eval()
    mode: Literal["RGB", "L"] = "RGB" if tok.in_channels == 3 else "L"
    out.mkdir(parents=True, exist_ok=True)
    for path in images:
        x = to_tensor(read_image(path, mode))[None].to(dev)  # [1, C, H, W]
        with torch.no_grad():
            codes = tok.encode(x)  # [1, h, w]
            recon = tok.decode(codes).clamp(-1, 1)
        target = out / f"{path.stem}.png"
        to_pil(recon)[0].save(target)
        click.echo(
            f"{path} -> {target}  codes {tuple(codes.shape[1:])}  "
            f"PSNR {float(psnr(recon.float(), x.float())[0]):.2f} dB"
        )


# -- eval ------------------------------------------------------------------------------------------
@click.group("eval")
def eval_group() -> None:
    """Measure a trained tokenizer or prior on a dataset."""


def _print_results(results: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    width = max(len(k) for k in results)
    for k, v in results.items():
        click.echo(f"{k:>{width}}: {v:.6g}" if isinstance(v, float) else f"{k:>{width}}: {v}")


def _data_options(f: Any) -> Any:
    """``--data``, ``--batch-size`` and ``--limit``, shared by both ``eval`` commands."""
    f = click.option(
        "--limit", default=None, type=click.IntRange(1), help="Use the first N images."
    )(f)
    f = click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))(f)
    return click.option(
        "--data",
        "data_path",
        required=True,
        type=_CONFIG,
        help="Dataset config file (or a train config with `data:`).",
    )(f)


@eval_group.command("tokenizer")
@click.argument("source", type=_SOURCE)
@_data_options
@click.option(
    "--lpips/--no-lpips",
    default=True,
    show_default=True,
    help="Also LPIPS (skipped with a note when its weights are not on disk).",
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option(
    "--inception",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also rFID, with these Inception-v3 weights (NVIDIA's TorchScript "
    "inception-2015-12-05.pt; latentgen never downloads them).",
)
@click.option(
    "--classifier",
    "classifier_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Also the share of reconstructions (and of the originals) this saved classifier reads "
    "as their label, overall and per class; the data must be labelled.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_tokenizer(
    source: Path,
    data_path: Path,
    batch_size: int,
    limit: int | None,
    lpips: bool,
    device: str,
    inception: Path | None,
    classifier_dir: Path | None,
    as_json: bool,
) -> None:
    """Reconstruction quality (PSNR, SSIM, LPIPS, with --classifier class accuracy) and
    codebook usage of SOURCE's tokenizer."""
    from latentgen.artifact import load_component
    from latentgen.evaluation import evaluate_tokenizer

    result = evaluate_tokenizer(
        load_component(source, "tokenizer"),
        _dataset_from_file(data_path),
        batch_size=batch_size,
        limit=limit,
        lpips="auto" if lpips else False,
        inception=inception,
        classifier=classifier_dir,
        device=_device(device),
    )
    if not as_json:
        for note in result.notes:
            click.echo(note, err=True)
    _print_results(result.as_dict(), as_json)


@eval_group.command("prior")
@click.argument("pipeline_dir", type=_SOURCE)
@_data_options
@click.option(
    "--key",
    "keys",
    multiple=True,
    metavar="NAME=KEY",
    help="Dataset key of a conditioner's data (default: its name).",
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_prior(
    pipeline_dir: Path,
    data_path: Path,
    batch_size: int,
    limit: int | None,
    keys: tuple[str, ...],
    device: str,
    as_json: bool,
) -> None:
    """Negative log-likelihood of the dataset's codes under PIPELINE_DIR's prior (bits per code)."""
    from latentgen.evaluation import evaluate_prior
    from latentgen.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(pipeline_dir)
    mapping = condition_key_map(pipe.conditioners, keys)
    result = evaluate_prior(
        pipe,
        _dataset_from_file(data_path),
        batch_size=batch_size,
        limit=limit,
        condition_keys=mapping,
        device=_device(device),
    )
    _print_results(result.as_dict(), as_json)
