"""iseg-plugin: an integer-only Segmenter for the quantization tools people already use."""

__version__ = "0.1.0"
