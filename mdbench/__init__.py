"""mdbench: reproducible benchmarks for efficient adaptation and compression of medical foundation models."""

__version__ = "0.1.0"
