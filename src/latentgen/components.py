"""What every registered component shares: it is built from one pydantic config and nothing else.

This module sits at the bottom of the import graph (plugins, registry and specs all build on it),
so it imports nothing of latentgen's but its errors.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict

from latentgen.errors import SpecError

__all__ = ["Component", "ComponentConfig"]


class ComponentConfig(BaseModel):
    """Base of every component config.

    Subclasses declare ``type: Literal["name"] = "name"``; the literal is how the registry and
    specs find the class. Configs are frozen (hashable, safe to share) and reject unknown fields
    so a typo in a spec is an error, not a silently ignored option.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    type: str

    @classmethod
    def type_name(cls) -> str:
        """The single string of this config's ``type: Literal[...]`` field."""
        field = cls.model_fields.get("type")
        ann = field.annotation if field is not None else None
        args: tuple[Any, ...] = tuple(get_args(ann))
        if get_origin(ann) is not Literal or len(args) != 1 or not isinstance(args[0], str):
            raise SpecError(
                f'{cls.__module__}.{cls.__qualname__} must declare `type: Literal["name"] = '
                f'"name"` with exactly one string; got {ann!r}.'
            )
        return str(args[0])


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
