"""iseg-plugin: an integer-only Segmenter for the quantization tools people already use.

Importing the package registers its models and hooks with MMSegmentation (configs load it with
``custom_imports = dict(imports=['iseg_plugin'])``).
"""

__version__ = "0.1.0"

from . import mmseg as _mmseg_registration  # noqa: E402,F401  (registers with mmseg on import)
