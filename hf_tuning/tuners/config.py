"""What every method's config shares: a validated dataclass that round-trips through ``adapter_config.json``.

The saved file has PEFT's shape (a flat JSON object with the method's name, its settings and
``base_model_name_or_path``), so tools that list adapter folders see ours too; the ``method`` key says
which of our methods to rebuild (PEFT's ``peft_type`` enum cannot name them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["PetlConfig", "PetlConfigError", "parse_block_indices"]


class PetlConfigError(ValueError):
    """A method config that cannot be used: a bad value, an unknown key, or a model it does not fit."""


@dataclass
class PetlConfig:
    """Base of every method's config.

    Attributes:
        base_model_name_or_path: the backbone the method was attached to (written to the saved config so a
            reader knows which base to load; filled in by the recipe).
    """

    method: ClassVar[str] = ""
    base_model_name_or_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the config") -> PetlConfig:
        """Rebuild from a saved dict; an unknown key or another method's file is refused by name."""
        values = dict(data)
        method = values.pop("method", cls.method)
        if method != cls.method:
            raise PetlConfigError(f"{source} is a {method!r} config, not {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PetlConfigError(
                f"{source}: unknown {cls.method} setting(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        return cls(**values)


def parse_block_indices(value: str | int | list[int] | tuple[int, ...] | None, what: str) -> tuple[int, ...] | None:
    """``"6-11"``, ``"0-3,8"``, ``7`` or ``[6, 7]`` -> sorted unique indices (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, int):
        items: list[int] = [value]
    elif isinstance(value, str):
        items = []
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            first, dash, last = part.partition("-")
            try:
                lo, hi = int(first), int(last) if dash else int(first)
            except ValueError:
                raise PetlConfigError(f"{what}={value!r}: expected block indices like '6-11' or '0-3,8'") from None
            if hi < lo:
                raise PetlConfigError(f"{what}={value!r}: the range {part} runs backwards")
            items.extend(range(lo, hi + 1))
    else:
        items = [int(v) for v in value]
    if not items:
        raise PetlConfigError(f"{what} is empty")
    if min(items) < 0:
        raise PetlConfigError(f"{what}={value!r}: block indices start at 0")
    return tuple(sorted(set(items)))
