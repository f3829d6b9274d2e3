"""The package's version (a leaf: the job's identity records it)."""

__version__ = "0.1.0"
