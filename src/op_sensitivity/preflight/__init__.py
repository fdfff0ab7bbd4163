"""Checks made before any work: the inputs a run names (stage ``check_params``, ``make repro``).

A layer above ``fallback`` (it resolves ``fallback.onnx_model`` as the fallback stage will) and
below ``plan``, which no stage may import."""
