"""op-sensitivity: per-op W8A8 quantization sensitivity of vision-language models.

The library behind the DVC stages in ``stages/``. One module per concept; only
:mod:`op_sensitivity.inc_engine` knows Intel Neural Compressor's internals.
"""

__version__ = "0.1.0"
