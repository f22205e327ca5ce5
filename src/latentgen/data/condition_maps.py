"""A dataset of condition maps as images: what a cond-stage tokenizer is trained on.

    data: {type: condition_maps, conditioner: {type: segmentation, num_classes: 7},
           data: {type: shapes, size: 4096, image_size: 32}}

Item ``i`` is ``{"image": conditioner.prepare(source[i][key])}``: the one-hot segmentation,
the depth map, the pose heatmaps, the edge map or the small image, exactly as the conditioner
hands it to its tokenizer, so ``latentgen train tokenizer`` trains the cond-stage tokenizer on
the same transform that runs at sampling time (the paper's VQGAN on one-hot maps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from latentgen.data.base import ImageDataset
from latentgen.errors import SpecError
from latentgen.specs import ComponentConfig, component_field

__all__ = ["ConditionMapsConfig", "ConditionMapsDataset"]

if TYPE_CHECKING:
    DatasetField = ComponentConfig
    ConditionerField = ComponentConfig
else:
    DatasetField = component_field("dataset")
    ConditionerField = component_field("conditioner")


class ConditionMapsConfig(ComponentConfig):
    """Config of ``condition_maps``: a paired dataset's condition, prepared as images."""

    type: Literal["condition_maps"] = "condition_maps"
    data: DatasetField = Field(
        description="The paired dataset, e.g. {type: shapes} or {type: paired_folder, ...}."
    )
    conditioner: ConditionerField = Field(
        description="The spatial conditioner whose maps are yielded (its `tokenizer` is "
        "ignored here: this is the data to train one)."
    )
    key: str | None = Field(
        None,
        description="Dataset key of the raw condition (default: the conditioner's type; "
        "`image` for edges and low_resolution, which derive from the image).",
    )


class ConditionMapsDataset(ImageDataset):
    """``{"image": maps [C, H, W]}`` of a spatial conditioner over a paired dataset."""

    Config = ConditionMapsConfig

    def __init__(self, config: ConditionMapsConfig) -> None:
        from latentgen import registry
        from latentgen.conditioners.spatial import SpatialConditioner

        super().__init__(config)
        cond_cfg = config.conditioner.model_copy(update={"tokenizer": None})
        cond = registry.build("conditioner", cond_cfg)
        if not isinstance(cond, SpatialConditioner):
            raise SpecError(
                f"condition_maps needs a spatial conditioner (segmentation, depth, pose, edges, "
                f"low_resolution), got '{cond_cfg.type}'."
            )
        self.conditioner = cond
        self.source = registry.build("dataset", config.data)
        default = "image" if cond_cfg.type in ("edges", "low_resolution") else cond_cfg.type
        self.key = config.key or default

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.source[index]
        if self.key not in item:
            raise SpecError(
                f"condition_maps reads key '{self.key}' but the dataset's items have "
                f"{sorted(item)}; set `key` to one of them."
            )
        image = item.get("image")
        size = None if image is None else (int(image.shape[-2]), int(image.shape[-1]))
        raw = item[self.key]
        if self.conditioner.config.type in ("edges", "low_resolution") and raw is image:
            raw = raw[None]  # a [3, H, W] image: one batch item, so it is derived, not a map
        maps = self.conditioner.prepare(raw, size)  # [1, C, H', W']
        return {"image": maps[0]}
