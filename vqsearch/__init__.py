"""vqsearch: nearest-neighbour search for codebooks and embedding banks."""

__version__ = "0.1.0"
