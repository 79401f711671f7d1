"""The linerec daemon: configuration, the line's call state machine, events and the service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("linerec")
except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
    __version__ = "0+unknown"
