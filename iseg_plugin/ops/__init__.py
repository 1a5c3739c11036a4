"""The operator registry (:mod:`.registry`), its entries (:mod:`.entries`), their deployed modules
(:mod:`.modules`) and the observer of the per-op front ends (:mod:`.observer`)."""
from .observer import IsegObserver
from .registry import REGISTRY, OpEntry, OpRegistry, UnknownVariantError, Variant

__all__ = ["IsegObserver", "REGISTRY", "OpEntry", "OpRegistry", "UnknownVariantError", "Variant"]
from . import entries as _entries  # noqa: E402,F401 - the registry's entries
