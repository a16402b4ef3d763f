"""The unlearning engine. Importing this package must stay cheap: torch is imported
only by the modules that train or evaluate, never by `workers.ml.specs`."""

import os

# oneDNN (bfloat16 products on the CPU) caches one primitive per input shape, up to 1024,
# and every batch has another sequence length: a job's resident set grew step by step
# with them. 16 took 0.20 GiB off a 24-step job's peak at no measured cost in time
# (docs/engine.md, "Memory"). Read when the cache is first used, so set before any
# product runs; an operator's own value wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
# PyTorch's ideep keeps its own cache of products per shape (up to 1024): a job's memory
# grew by ~80 MB over 32 steps with it; 64 holds a step's shapes (no cost in time
# measured, docs/engine.md, "Memory").
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")
