"""torch.ao FX quantization patterns for the integer-only Segmenter (BackendConfig, QConfigMapping).

Filled by the FX front-end issue; the package exists so the distribution's layout is final.
"""
