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

    @staticmethod
    def watchdog_interval() -> float | None:
        """Seconds within which systemd wants a WATCHDOG=1 (the unit's WatchdogSec), or
        None when no watchdog is armed for this process."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid != str(os.getpid()):
            return None  # meant for the process that started us
        return int(usec) / 1_000_000

    def watchdog(self) -> None:
        systemd.daemon.notify("WATCHDOG=1")

    def ready(self, status: str) -> None:
        systemd.daemon.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        systemd.daemon.notify(f"STATUS={status}")

    def stopping(self) -> None:
        systemd.daemon.notify("STOPPING=1\nSTATUS=stopping")
