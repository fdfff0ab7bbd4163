"""The plan ``make repro`` prints before DVC starts: per stage that will run, what it will do, on
which device, and the expected time and memory where this machine can tell (a runtime file of
its own or a probe of a few seconds); and a stop, naming the params to change, for a plan that
cannot fit this machine (``scripts/check_params.py``)."""
