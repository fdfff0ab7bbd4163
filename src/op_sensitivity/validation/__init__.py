"""Measuring keep-lists on held-out captions: the metrics (``metrics``), the calibrated model that
scores any configuration (``measure``), each ranking's curve against random lists (``curve``), the
chosen list checked the same way and against a real INC PTQ run (``validate``), its recovered
share with a bootstrap interval over the test images (``interval``)."""
