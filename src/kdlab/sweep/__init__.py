"""Experiment grids: expansion, deterministic run naming, executors, and the demo.

- :mod:`kdlab.sweep.grid`: a grid (:class:`~kdlab.config.sweep.SweepConfig`) → a plan of runs
  with deterministic directories and cost estimates (nothing is loaded);
- :mod:`kdlab.sweep.runner`: executes a plan stage by stage, skipping completed runs and
  recording failures (``FAILED.json``, ``sweep_status.json``);
- :mod:`kdlab.sweep.executors`: ``local`` (in-process) and ``submitit`` (SLURM) executors;
- :mod:`kdlab.sweep.stage`: the ``kdlab sweep`` command line (see ``docs/sweeps.md``);
- :mod:`kdlab.sweep.demo`: the ``kdlab demo`` pipeline.
"""
