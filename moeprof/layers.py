"""Which decoder layers to log: the syntax of ``VLLM_MOE_LAYER`` and ``--log-layer``.

A selection is one index (``12``), a comma-separated list of indices and inclusive ranges
(``0,12,23``, ``0-11,23``) or ``all`` (every MoE layer the model has). It is parsed before the
engine starts, so a typo is refused at once; which layers it names is resolved against the
loaded model (:meth:`LayerSelection.resolve`), where a dense layer named explicitly is refused
with the list of the model's MoE layers and ``all`` skips dense layers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

ALL = "all"


class LayerSpecError(ValueError):
    """A layer selection that cannot be parsed, or that names layers the model does not route."""


@dataclass(frozen=True)
class LayerSelection:
    """Layers named by the user; ``indices`` is None for ``all``."""

    indices: tuple[int, ...] | None

    @property
    def is_all(self) -> bool:
        return self.indices is None

    def resolve(self, moe_layers: Collection[int], model: str = "the model") -> list[int]:
        """The layers to log, ascending, checked against the model's MoE layers.

        The error for layers that are not MoE layers starts with those indices, so a caller
        can put the setting's name in front (``VLLM_MOE_LAYER=4 is not an MoE layer ...``).
        """
        available = sorted(moe_layers)
        if not available:
            raise LayerSpecError(f"{model} has no MoE layer to log")
        if self.indices is None:
            return available
        missing = [i for i in self.indices if i not in moe_layers]
        if missing:
            which = "is not an MoE layer" if len(missing) == 1 else "are not MoE layers"
            raise LayerSpecError(
                f"{format_layers(missing)} {which} of {model}; "
                f"its MoE layers are {format_layers(available)}"
            )
        return list(self.indices)

    def __str__(self) -> str:
        return ALL if self.indices is None else format_layers(self.indices, sep=",")


def parse_layers(text: str) -> LayerSelection:
    """``"12"``, ``"0,12,23"``, ``"0-11,23"`` or ``"all"`` -> a :class:`LayerSelection`."""
    spec = text.strip().lower()
    if spec == ALL:
        return LayerSelection(None)
    if not spec:
        raise LayerSpecError(
            "no layer given (an index such as 12, a list 0,12, a range 0-11, or all)"
        )
    indices: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo_text, dash, hi_text = part.partition("-")
        lo, hi = _index(lo_text, text), _index(hi_text, text) if dash else None
        if hi is None:
            indices.add(lo)
        elif hi < lo:
            raise LayerSpecError(f"{text!r}: range {part} runs backwards")
        else:
            indices.update(range(lo, hi + 1))
    return LayerSelection(tuple(sorted(indices)))


def _index(part: str, whole: str) -> int:
    part = part.strip()
    if not part.isdigit():
        raise LayerSpecError(
            f"{whole!r} is not a layer selection: use an index >= 0 (12), a list (0,12,23), "
            "ranges (0-11,23) or all"
        )
    return int(part)


def format_layers(values: Iterable[int], sep: str = ", ") -> str:
    """[0, 1, 2, 5] -> '0-2, 5': a 60-layer list stays readable in one line."""
    out: list[str] = []
    ordered = sorted(set(values))
    if not ordered:
        return ""
    start = prev = ordered[0]
    for v in [*ordered[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if v is not None:
            start = prev = v
    return sep.join(out)
