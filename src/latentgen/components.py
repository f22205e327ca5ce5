"""What every registered component shares: it is built from one pydantic config and nothing else."""

from __future__ import annotations

from typing import Any, ClassVar

from latentgen.specs import ComponentConfig


class Component:
    """Mixin for registered classes: ``Config`` names the config model, ``kind`` the registry kind.

    ``cls(config)`` must rebuild the component completely, so a spec is all a saved pipeline
    needs besides its weights.
    """

    Config: ClassVar[type[ComponentConfig]]
    kind: ClassVar[str]

    config: Any

    @classmethod
    def type_name(cls) -> str:
        """The registered type name, read from ``cls.Config``."""
        return cls.Config.type_name()
