"""The benchmark harness (issue 6): ``bench/run``, or ``python -m bench``.

It starts what it measures on loopback (broker, gunicorn-served API, workers,
and a no-op Falcon "ceiling" under the same gunicorn configuration), drives
them with wrk (or a small pure-Python load generator when wrk is absent), and
reports every figure beside the ceiling measured in the same run.
See ``bench/README.md``.
"""
