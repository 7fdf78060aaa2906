"""Run directories and what a run writes: the directory lock and files, loading a run back,
per-epoch progress lines, plots, presets and the stored dense references.

Built on :mod:`maestro_lod.training` (a run is a training on disk); used by the commands and the
benchmarks.
"""
