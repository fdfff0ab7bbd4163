"""Sensitivity engines: one contract (``contract``), two implementations, one runner, one artifact.

``contract`` (the pass specification every engine receives and the raw result it returns),
``inc`` (the only module that knows Intel Neural Compressor's internals), ``native`` (the
same measurements in plain PyTorch, CPU or GPU), ``runner`` (stage inputs -> spec -> engine ->
files), ``artifact`` (schema of ``op_sensitivity.json``: build, validate, read, write).
"""
