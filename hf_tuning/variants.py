"""The tuning variants: OST and Diffusion Tuning DT1 to DT4, defined in one table.

Each DT variant is a partition scheme (how the trainable space is split into subspaces
P0..P(N-1)) combined with an optimisation order (which subspaces each stage trains):

======  ==========  ===========  =======================================================
name    partition   order        stages (N = number of groups)
======  ==========  ===========  =======================================================
ost     none        single       [all]
dt1     adjacent    exclusive    [G0], [G1], [G2], [G3]            (D-A + S-Q)
dt2     adjacent    cumulative   [G0], [G0,G1], [G0..G2], [all]    (D-A + S-G)
dt3     cross       exclusive    [even], [odd]                     (D-C + S-Q)
dt4     cross       cumulative   [even], [all]                     (D-C + S-G)
======  ==========  ===========  =======================================================

The head and final norm are trained in every stage (see :mod:`hf_tuning.partition`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TuningVariant", "VARIANTS", "get_variant"]


@dataclass(frozen=True)
class TuningVariant:
    """A tuning variant: ``partition`` is ``None`` for OST; ``schedule`` is one of
    ``single`` (one stage with everything), ``exclusive`` (stage k trains only group k) or
    ``cumulative`` (stage k trains groups 0..k; the last stage trains everything)."""

    name: str
    partition: str | None
    schedule: str
    description: str


VARIANTS: dict[str, TuningVariant] = {
    "ost": TuningVariant("ost", None, "single", "one-step tuning: every trainable parameter at once"),
    "dt1": TuningVariant("dt1", "adjacent", "exclusive", "adjacent depth groups, one at a time"),
    "dt2": TuningVariant("dt2", "adjacent", "cumulative", "adjacent depth groups, cumulatively"),
    "dt3": TuningVariant("dt3", "cross", "exclusive", "even blocks, then odd blocks"),
    "dt4": TuningVariant("dt4", "cross", "cumulative", "even blocks, then everything"),
}


def get_variant(name: str) -> TuningVariant:
    try:
        return VARIANTS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown DT variant {name!r}; expected one of {', '.join(VARIANTS)}") from None
