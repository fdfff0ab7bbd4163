"""The model layer: where a Qwen2.5-VL comes from and how calibration records become its inputs.

``source`` (the ``load_model`` stage's artifact: tiny, full-size random or a local snapshot),
``tiny`` / ``full_size`` (seeded random architectures; published config values in ``configs/``),
``tokenizer`` (trained on the captions for the random models), ``processor`` (image-only
Qwen2.5-VL processor), ``batches`` (records -> model inputs).
"""
