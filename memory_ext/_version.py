"""The package version, in one place: setup.py reads it from this file, memory_ext exports it."""
__version__ = "0.1.0"
