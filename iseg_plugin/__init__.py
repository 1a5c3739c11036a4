"""iseg-plugin: an integer-only Segmenter for the quantization tools people already use.

``import iseg_plugin`` loads neither MMSegmentation nor mmcv. The mmseg registrations (models, hooks) are in
:mod:`iseg_plugin.mmseg`, which configs load with ``custom_imports = dict(imports=['iseg_plugin.mmseg'])``.
"""

__version__ = "0.1.0"
