"""``ISegmenter``: mmseg's ``EncoderDecoder`` that builds the integer model when ``quant`` is set."""
from __future__ import annotations

from mmseg.models.segmentors import EncoderDecoder


class ISegmenter(EncoderDecoder):
    """EncoderDecoder for the plugin's Segmenter.

    With ``quant=None`` it is the float Segmenter (``IVisionTransformer`` + ``ISegmenterMaskHead``).
    With ``quant=dict(gelu=..., softmax=...)`` the backbone and head are built as their quantized
    versions in ``__init__`` (mmengine's runner builds the optimizer before any hook runs, so a
    hook cannot swap modules; ecosystem notes §3). Checkpoints of either form load into either.
    """

    QUANT_TYPES = {"IVisionTransformer": "IQuantVisionTransformer", "ISegmenterMaskHead": "IQuantSegmenterMaskHead"}

    def __init__(self, backbone: dict, decode_head: dict, quant: dict | None = None, **kwargs):
        if quant is not None:
            backbone = self._quantized(backbone, quant)
            decode_head = self._quantized(decode_head, quant)
        super().__init__(backbone=backbone, decode_head=decode_head, **kwargs)
        if quant is not None and getattr(self.data_preprocessor, "_enable_normalize", False):
            self.backbone.input_quant.set_normalization(self.data_preprocessor.mean, self.data_preprocessor.std)

    @classmethod
    def _quantized(cls, cfg: dict, quant: dict) -> dict:
        kind = cfg.get("type")
        target = cls.QUANT_TYPES.get(kind, kind if kind in cls.QUANT_TYPES.values() else None)
        if target is None:
            raise ValueError(
                f"ISegmenter(quant=...) needs an IVisionTransformer backbone and an ISegmenterMaskHead head, "
                f"got type={kind!r}"
            )
        return {**cfg, "type": target, "quant": quant}
