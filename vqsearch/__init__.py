"""vqsearch: nearest-neighbour search for codebooks and embedding banks."""

import os

# oneDNN and its ideep wrapper each keep up to 1024 compiled primitives, a bf16 matmul's
# holding MiBs: a server seeing many batch and bank sizes grows by one per shape (bf16
# candidate scans, vqsearch/index/_precision.py); with 16 of each its memory stays flat. They
# are read when torch loads, so they are set before anything here imports torch; a process
# that imported torch first keeps its own settings.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
os.environ.setdefault("LRU_CACHE_CAPACITY", "16")

__version__ = "0.1.0"
