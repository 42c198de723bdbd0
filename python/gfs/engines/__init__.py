"""Engines: how a selection is computed from the data.

- stream: features in memory, one pass over U per step through a backend (gfs_kernels).
The API layer (gfs.select) picks an engine and turns its result into a Selection.
"""
