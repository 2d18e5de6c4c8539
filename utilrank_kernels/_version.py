"""The installed distribution's version, from its metadata (pyproject.toml is the one place it is written)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("utilrank-kernels")
except PackageNotFoundError:  # a source tree on sys.path without `pip install`
    __version__ = "0+unknown"
