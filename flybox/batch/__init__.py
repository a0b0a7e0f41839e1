"""Batch work behind ``flybox extract`` and ``flybox mask``: planning and running many
micrographs or files on the worker pool (no command-line flags here; the CLI maps them).
"""
