"""The registry of on-disk formats: name -> :class:`~.format_base.QuantFormat`.

Every format module lists its instances in ``FORMATS`` and imports only ``format_base``; this module
collects them, so the dependency runs one way (registry -> formats -> format_base). ``register``
adds a format from outside the package (a plugin).
"""
from __future__ import annotations

from . import fmt_awq, fmt_bitblas, fmt_compressed_tensors, fmt_eqat, fmt_gptq
from .format_base import QuantFormat

FORMATS: dict[str, QuantFormat] = {}


def register(fmt: QuantFormat) -> QuantFormat:
    if not fmt.name:
        raise ValueError("a format needs a name")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(sorted(FORMATS))}") from None


for _module in (fmt_eqat, fmt_gptq, fmt_bitblas, fmt_awq, fmt_compressed_tensors):
    for _fmt in _module.FORMATS:
        register(_fmt)
