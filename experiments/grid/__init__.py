"""Ablation grids and their report: ``hardneg grid FILE`` and ``hardneg report DIR``.

- ``spec``: a grid YAML file expanded into cells (``GridSpec``); ``cell``: one run of it (``Cell``).
- ``command``: the ``hardneg grid`` command, running the cells on Ray Tune and resuming after a crash.
- ``runner``: one cell as a ``hardneg`` subprocess (``fate_share``: it dies with its worker);
  ``progress``: the live progress line and time estimate.
- ``run_folder``: what a finished run left in its folder; ``report`` and ``report_plots``: the
  mean +/- std tables and the plots of ``hardneg report``.
"""
