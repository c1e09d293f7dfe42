"""The pass base class, typed pass options and statistics counters."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, ClassVar

from sparsa.ir.core import Module

# pass name -> class; filled once at import time by `Pass.__init_subclass__`.
PASS_REGISTRY: dict[str, type[Pass]] = {}


class Option:
    """A typed pass option with a default, written `pass-name{name=value}` in a pipeline."""

    def __init__(self, type: type, default: Any, help: str):
        self.type = type
        self.default = default
        self.help = help
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Pass | None, owner: type) -> Any:
        if obj is None:
            return self
        return obj.options.get(self.name, self.default)

    def parse(self, text: str) -> Any:
        if self.type is bool:
            if text not in ("true", "false", "1", "0"):
                raise ValueError(f"option '{self.name}' takes true or false, got '{text}'")
            return text in ("true", "1")
        try:
            return self.type(text)
        except ValueError:
            raise ValueError(f"option '{self.name}' takes a {self.type.__name__}, got '{text}'") from None

    def format(self, value: Any) -> str:
        return ("true" if value else "false") if isinstance(value, bool) else str(value)


class Pass(ABC):
    """A module-to-module transformation with a kebab-case NAME, options as fields and statistics."""

    NAME: ClassVar[str] = ""
    option_fields: ClassVar[list[Option]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.option_fields = [v for base in reversed(cls.__mro__) for v in vars(base).values() if isinstance(v, Option)]
        if cls.NAME:
            if not (cls.__doc__ or "").strip():
                raise TypeError(f"pass {cls.NAME} needs a one-line docstring")
            PASS_REGISTRY[cls.NAME] = cls

    def __init__(self, **options: Any):
        known = {o.name for o in self.option_fields}
        for name in options:
            if name not in known:
                have = ", ".join(sorted(known)) or "none"
                raise ValueError(f"pass '{self.NAME}' has no option '{name}' (it has: {have})")
        self.options: dict[str, Any] = dict(options)
        self.stats: Counter[str] = Counter()

    @abstractmethod
    def run(self, module: Module) -> None:
        """Transform `module` in place; count what fired in `self.stats`."""

    def __str__(self) -> str:
        """The pass as written in a pipeline: options that were set explicitly, in declaration order."""
        opts = [f"{o.name}={o.format(self.options[o.name])}" for o in self.option_fields if o.name in self.options]
        return self.NAME + ("{" + " ".join(opts) + "}" if opts else "")
