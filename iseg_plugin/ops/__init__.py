"""The operator registry (:mod:`.registry`), its entries (:mod:`.entries`), their deployed modules
(:mod:`.modules`) and the observer of the per-op front ends (:mod:`.observer`)."""
from .observer import IsegObserver
from .grid import Grid
from .registry import REGISTRY, OpCall, OpEntry, OpRegistry, UnknownVariantError, UnsupportedOpError, Variant

__all__ = ["Grid", "IsegObserver", "REGISTRY", "OpCall", "OpEntry", "OpRegistry", "UnknownVariantError", "UnsupportedOpError",
           "Variant"]
from . import entries as _entries  # noqa: E402,F401 - the registry's entries
