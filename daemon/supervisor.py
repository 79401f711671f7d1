"""Talking to the service manager: the only module that imports systemd-python."""

from __future__ import annotations

import logging
import os
import sys

import systemd.daemon
import systemd.journal


def under_journald() -> bool:
    """systemd sets JOURNAL_STREAM when stderr is connected to the journal."""
    return bool(os.environ.get("JOURNAL_STREAM"))


def configure_logging(verbose: bool = False) -> None:
    """Configure logging once, at the entry point: journald under systemd, else stderr."""
    handler: logging.Handler
    if under_journald():
        handler = systemd.journal.JournalHandler(SYSLOG_IDENTIFIER="linerec")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("linerec")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


class ServiceNotifier:
    """sd_notify(3) messages; each is a no-op when NOTIFY_SOCKET is not set."""

    def ready(self, status: str) -> None:
        systemd.daemon.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        systemd.daemon.notify(f"STATUS={status}")

    def stopping(self) -> None:
        systemd.daemon.notify("STOPPING=1\nSTATUS=stopping")
