"""Calibration data: COCO captions sampling (``coco``) and the calibration directory (``calibration``).

Knows nothing about models: the model layer turns these records into model inputs.
"""
