"""Engines: how a selection is computed, and the one place that decides how.

- plan: the one planner (engine, backend, placement, and why), from the registry's declared
  capabilities and the cost model;
- cost: the one cost model (streaming vs Gram seconds, memory, the layer statistics' method);
- uniform, line_search, refit: the step rules, one module each, each with its streaming loop
  (over a backend's `prepare` / `dots`) and its Gram loop (over rows of G): the readable
  statement of the rule that the native kernels follow;
- stream: the streaming engine (features in memory, one pass over U per step);
- gram: the Gram engine (sufficient statistics, O(N) per step) and the build of G.
The API layer (gfs.select) asks `plan`, runs the engine and turns its result into a Selection.
"""
