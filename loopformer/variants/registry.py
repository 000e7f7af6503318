"""A name -> class table for one kind of variant (a halting kind, an exit rule, a cache policy, ...).

A variant is a small class registered under the name users write in YAML or on the command line::

    HALTINGS = Registry("halting kind", "model.stages.S.circuits.C.halting.kind")

    @HALTINGS.register("ouro")
    class Ouro(Halting): ...

    HALTINGS.get("ouro", where="...halting.kind")   # the class; an unknown name is one line naming the choices

Adding a variant is one class in its family's file (`loopformer/variants/*.py`) plus its test: the
config validation, the CLI's choices and the model all read the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from loopformer.errors import ConfigError, LoopformerError, lookalike

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one variant family by name, in registration order."""

    def __init__(self, what: str):
        self.what = what
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register under ``name`` (also set as the class's ``kind``)."""

        def add(cls: T) -> T:
            if name in self._classes:
                raise ValueError(f"{self.what} '{name}' is registered twice ({self._classes[name].__name__}, "
                                 f"{cls.__name__})")
            cls.kind = name
            self._classes[name] = cls
            return cls

        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def get(self, name: str, where: str = "", error: type[LoopformerError] = ConfigError) -> T:
        """The class registered as ``name``; ``error`` (one line: ``where``, the name, the choices) if none."""
        if name not in self._classes:
            head = f"{where}: " if where else ""
            raise error(f"{head}'{name}' is not one of {', '.join(self._classes)}{lookalike(name, self.names())}")
        return self._classes[name]
