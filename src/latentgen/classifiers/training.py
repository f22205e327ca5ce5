"""Training a classifier with the shared ``Trainer``, and measuring its held-out accuracy.

    latentgen train classifier --config src/latentgen/configs/shapes-classifier.yaml

The data is any registered dataset whose items carry an integer ``label`` (shapes,
Fashion-MNIST, an image folder with one sub-folder per class). Held-out images come from the
``held_out`` dataset, or else the last ``held_out_fraction`` of ``data`` (a seeded split); the
export's config records the accuracy on them (``Classifier.held_out_accuracy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from latentgen.classifiers.base import Classifier
from latentgen.errors import DataError, SpecError
from latentgen.specs import ComponentConfig, component_field
from latentgen.training.config import TrainConfig
from latentgen.training.task import StepContext, Task, mean_over_micro_batches, module_device

if TYPE_CHECKING:
    from latentgen.training.config import TrainerConfig
    from latentgen.training.loop import TrainResult

    ClassifierField = ComponentConfig
    DatasetField = ComponentConfig
else:
    ClassifierField = component_field("classifier")
    DatasetField = component_field("dataset")

__all__ = [
    "ClassifierTask",
    "ClassifierTrainConfig",
    "LabelledImages",
    "accuracy",
    "prepare_classifier_data",
    "train_classifier",
]


class ClassifierTrainConfig(TrainConfig):
    """``latentgen train classifier --config``: a classifier config, labelled data, trainer."""

    classifier: ClassifierField = Field(
        description="Classifier config, e.g. {type: cnn, num_classes: 6, image_size: 32}."
    )
    held_out: DatasetField | None = Field(
        None,
        description="Held-out dataset for the stored accuracy (None: the last "
        "held_out_fraction of `data`, which is then not trained on).",
    )
    held_out_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of `data` held out when `held_out` is not given."
    )
    hflip: bool = Field(
        True, description="Flip training images left-right at random (off for text, digits...)."
    )
    eval_batch_size: int = Field(256, ge=1, le=65_536, description="Batch size when measuring.")

    @model_validator(mode="after")
    def _is_classifier(self) -> ClassifierTrainConfig:
        for key in ("num_classes", "image_size", "in_channels"):
            if not hasattr(self.classifier, key):
                raise ValueError(
                    f"classifier type '{self.classifier.type}' has no `{key}` in its config; a "
                    "classifier config subclasses latentgen.classifiers.ClassifierConfig."
                )
        return self


class LabelledImages(Dataset[dict[str, Any]]):
    """``{"image", "label"}`` items of ``indices`` of a dataset; a bad label is a ``DataError``."""

    def __init__(self, dataset: Any, indices: Sequence[int], num_classes: int, name: str) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.num_classes = num_classes
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[self.indices[i]]
        label = item.get("label")
        where = f"item {self.indices[i]} of {self.name}" + (
            f" ({item['path']})" if "path" in item else ""
        )
        if label is None:
            raise DataError(
                f"{where} has no 'label'; a classifier trains on labelled images (an image "
                "folder needs one sub-folder per class: root/<class>/*.png)."
            )
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"{where} has label {label}, outside [0, {self.num_classes}) of the classifier's "
                "num_classes; raise classifier.num_classes or fix the data."
                + (" (-1: the file is not inside a class sub-folder)" if label == -1 else "")
            )
        return {"image": item["image"], "label": label}


def _check_folder_labels(dataset: Any, name: str) -> None:
    """An image folder must have class sub-folders and no image outside them (checked up front)."""
    root, files = getattr(dataset, "root", None), getattr(dataset, "files", None)
    if root is None or files is None or not hasattr(dataset, "classes"):
        return
    if not dataset.classes:
        raise DataError(
            f"{name}: the image folder {root} is unlabelled (no class sub-folders, or "
            "labels_from_subfolders is false); put each class's images in its own sub-folder, "
            "e.g. root/cat/*.png and root/dog/*.png, and set labels_from_subfolders: true."
        )
    loose = [f for f in files if Path(f).parent == Path(root)]
    if loose:
        shown = ", ".join(str(f) for f in loose[:3]) + (" ..." if len(loose) > 3 else "")
        raise DataError(
            f"{name}: {len(loose)} image(s) lie directly in {root}, outside any class "
            f"sub-folder ({shown}); move each into root/<class>/ or remove it."
        )


def prepare_classifier_data(
    cfg: ClassifierTrainConfig,
) -> tuple[ComponentConfig, LabelledImages, LabelledImages]:
    """The classifier config (class names filled in) and the train and held-out images.

    Checks before any training: labels exist, the class count and the image size and channels
    agree with the classifier's config; each mismatch is an error naming the fix.
    """
    from latentgen import registry

    ccfg: Any = cfg.classifier
    data = registry.build("dataset", cfg.data)
    _check_folder_labels(data, "data")
    if len(data) == 0:
        raise DataError("the `data` dataset is empty; point it at labelled images.")
    classes = tuple(str(c) for c in getattr(data, "classes", ()) or ())
    if classes and len(classes) != ccfg.num_classes:
        raise SpecError(
            f"the classifier has num_classes={ccfg.num_classes} but the data has {len(classes)} "
            f"classes ({', '.join(classes)}); set classifier.num_classes: {len(classes)}."
        )
    if classes and not ccfg.class_names:
        ccfg = ccfg.model_copy(update={"class_names": classes})
    first = data[0]
    image = first.get("image")
    want = (ccfg.in_channels, ccfg.image_size, ccfg.image_size)
    if not isinstance(image, Tensor) or tuple(image.shape) != want:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise SpecError(
            f"the data's images are {got} but the classifier takes {list(want)} (in_channels, "
            "image_size, image_size); set classifier.image_size / in_channels to match, or the "
            "dataset's image_size / channels."
        )
    if "label" not in first:
        raise DataError(
            f"the `data` dataset ({cfg.data.type}) gives no 'label' with its images; a classifier "
            "needs labelled data (shapes, fashion_mnist, or an image folder with one sub-folder "
            "per class)."
        )
    n = len(data)
    if cfg.held_out is None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.trainer.seed))
        n_held = max(1, round(n * cfg.held_out_fraction))
        if n - n_held < 1:
            raise DataError(
                f"`data` has {n} image(s): too few to hold out {cfg.held_out_fraction:.0%} and "
                "still train; add images or give a separate `held_out` dataset."
            )
        train_idx, held_idx = perm[n_held:].tolist(), perm[:n_held].tolist()
        held_src: Any = data
    else:
        held_src = registry.build("dataset", cfg.held_out)
        _check_folder_labels(held_src, "held_out")
        if len(held_src) == 0:
            raise DataError("the `held_out` dataset is empty; point it at labelled images.")
        train_idx, held_idx = list(range(n)), list(range(len(held_src)))
    train = LabelledImages(data, train_idx, ccfg.num_classes, "data")
    held = LabelledImages(held_src, held_idx, ccfg.num_classes, "held_out")
    return ccfg, train, held


@torch.no_grad()
def accuracy(classifier: Classifier, dataset: Dataset[Any], batch_size: int = 256) -> float:
    """Share of ``dataset``'s items (``image``, ``label``) whose top class is the label."""
    was_training = classifier.training
    classifier.eval()
    device = module_device(classifier)
    right = total = 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            pred = classifier.logits(batch["image"].to(device)).argmax(-1)  # [B]
            right += int((pred.cpu() == batch["label"]).sum())
            total += len(pred)
    finally:
        classifier.train(was_training)
    if total == 0:
        raise DataError("no images to measure the accuracy on.")
    return right / total


class ClassifierTask(Task):
    """Cross-entropy of ``batch["image"]`` against ``batch["label"]``; export stores the accuracy.

    Args:
        classifier: the classifier to train.
        held_out: labelled images measured at export.
        hflip: flip training images left-right at random.
        eval_batch_size: batch size when measuring.
    """

    def __init__(
        self,
        classifier: Classifier,
        held_out: Dataset[Any] | None = None,
        hflip: bool = True,
        eval_batch_size: int = 256,
    ) -> None:
        self.classifier = classifier
        self.held_out = held_out
        self.hflip = hflip
        self.eval_batch_size = eval_batch_size
        self.held_out_accuracy: float | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"classifier": self.classifier}

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"classifier": list(self.classifier.parameters())}

    def ddp_modules(self) -> dict[str, nn.Module]:
        # DDP averages the gradients during backward; forward gives logits, the loss follows.
        return {"classifier": self.classifier}

    def describe(self) -> dict[str, Any]:
        return {"task": "classifier", "classifier": self.classifier.config.model_dump(mode="json")}

    def train_step(self, ctx: StepContext) -> dict[str, float | Tensor]:
        logs: dict[str, Any] = {}
        n = len(ctx.micro_batches)
        for batch in ctx.micro_batches:
            x, y = batch["image"], batch["label"]  # [B, C, S, S], [B]
            if self.hflip:
                flip = torch.rand(x.shape[0], device=x.device) < 0.5  # [B]
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with ctx.autocast():
                logits = ctx.module("classifier")(x)  # [B, num_classes]
                loss = F.cross_entropy(logits.float(), y)
            ctx.backward(loss, "classifier")
            acc = (logits.detach().argmax(-1) == y).float().mean()
            mean_over_micro_batches(logs, {"loss": loss.detach(), "train_accuracy": acc}, n)
        logs["grad_norm"] = ctx.update("classifier")
        return logs

    def export(self, path: Path) -> Path:
        """Measure the held-out accuracy, record it in the config, and save the component."""
        from latentgen.artifact import save_component

        model = self.classifier
        if self.held_out is not None:
            self.held_out_accuracy = accuracy(model, self.held_out, self.eval_batch_size)
        trained = model.config
        # The export's config carries the measurement; training (and --resume) keeps the one it
        # started from, so a resumed run's task description still matches its checkpoints.
        model.config = trained.model_copy(update={"held_out_accuracy": self.held_out_accuracy})
        try:
            return save_component(model, "classifier", path)
        finally:
            model.config = trained


def train_classifier(
    cfg: ClassifierTrainConfig,
    trainer: TrainerConfig | None = None,
    *,
    resume: bool = False,
    allow_change: Sequence[str] = (),
    command: str | None = None,
) -> tuple[TrainResult, ClassifierTask]:
    """Train ``cfg``'s classifier (``trainer`` overrides ``cfg.trainer``); export to run/final."""
    from latentgen import registry
    from latentgen.training.distributed import init_distributed, shutdown_distributed
    from latentgen.training.loop import Trainer

    tcfg = trainer if trainer is not None else cfg.trainer
    ccfg, train, held = prepare_classifier_data(cfg)
    info = init_distributed(tcfg.device)
    try:
        torch.manual_seed(tcfg.seed)  # the initial weights follow the config's seed
        classifier = registry.build("classifier", ccfg)
        task = ClassifierTask(classifier, held, cfg.hflip, cfg.eval_batch_size)
        if info.is_main:
            from latentgen.files import atomic_write_json

            tcfg.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(tcfg.run_dir / "train_config.json", cfg.model_dump(mode="json"))
        result = Trainer(task, train, tcfg, dist=info, command=command).fit(
            resume=resume, allow_change=allow_change
        )
    finally:
        shutdown_distributed()
    return result, task
