"""Engines: how a selection is computed from the data.

- stream: features in memory, one pass over U per step through a backend (gfs_kernels).
- gram: sufficient statistics (gfs.GramStats: G = U U^T, b = U y, ||y||^2, count), O(N) per step;
  native C++ loop on CPU, a persistent Triton program on GPU (uniform rule), torch loops anywhere.
- cost: the cost model behind engine="auto".
The API layer (gfs.select) picks an engine and turns its result into a Selection.
"""
