"""op-sensitivity: per-op W8A8 quantization sensitivity of vision-language models.

The library behind the DVC stages in ``stages/``. Layers, each importing only those above it
in this list (``tests/test_dag.py`` checks it):

* shared vocabulary: ``errors``, ``atomic``, ``phases``, ``params``, ``inventory``, ``cli``
* ``data``: COCO captions sampling and the calibration directory
* ``model``: model sources, tokenizer, processor, records -> model inputs
* ``engines``: the pass contract, the INC and native engines, the runner, ``op_sensitivity.json``
* ``report``: scores, Markdown report, plots, engine comparison
* ``fallback``: keep-list policies, the keep-list document, exports per quantizer

Only :mod:`op_sensitivity.engines.inc_loop` knows Intel Neural Compressor's internals.
"""

__version__ = "0.1.0"
