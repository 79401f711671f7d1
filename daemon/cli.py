"""The `linerec` command: run, check-config, simulate, demo, verify, recordings, decrypt."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from datetime import date
from pathlib import Path
from types import FrameType

from linerec.daemon import __version__, archive
from linerec.daemon.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from linerec.daemon.events import EventBus, EventSink, JsonLinesSink, LogSink
from linerec.daemon.paths import SEALED_SUFFIX
from linerec.daemon.receipt import file_sha256
from linerec.daemon.runtime import Recorder, StorageError
from linerec.daemon.service import Outcome, StartupChecks, serve
from linerec.daemon.supervisor import ServiceNotifier, configure_logging
from linerec.hw.base import HardwareError
from linerec.hw.scenario import ScenarioError, load_scenario

logger = logging.getLogger("linerec.cli")

EXIT_CONFIG = 2
EXIT_RESTART = 3
"""Device settings changed over MQTT and every line is free: systemd (Restart=on-failure)
starts linerec again with them."""
"""Exit status for a bad config or scenario: systemd's RestartPreventExitStatus uses it."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_CONFIG
    configure_logging(args.verbose)
    # Recordings, receipts, the audit log, the outbox and exports hold personal data: only
    # their owner may read them (0600, folders 0700), whatever umask linerec inherits.
    os.umask(0o077)
    return int(args.handler(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linerec", description=__doc__)
    parser.add_argument("--version", action="version", version=f"linerec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the recorder daemon on the real HAT")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                     help=f"config file (default {DEFAULT_CONFIG_PATH})")
    run.set_defaults(handler=cmd_run)

    check = sub.add_parser("check-config", help="check a config file; exit 0 or 2")
    check.add_argument("path", type=Path, nargs="?", default=DEFAULT_CONFIG_PATH)
    check.set_defaults(handler=cmd_check_config)

    doctor = sub.add_parser("doctor", help="check config, devices, pins, disclosures, storage, "
                            "clock, broker and the service user's rights; say how to fix what "
                            "fails; exit 0 only when all pass")
    doctor.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, metavar="FILE",
                        help=f"config file (default {DEFAULT_CONFIG_PATH})")
    doctor.add_argument("--user", metavar="NAME", help="the user the service runs as "
                        "(default: linerec when run as root, else this user's own rights)")
    doctor.add_argument("--json", action="store_true", help="one JSON array instead of lines")
    doctor.set_defaults(handler=cmd_doctor)

    sim = sub.add_parser("simulate", help="run the daemon on the simulated HAT")
    sim.add_argument("--scenario", type=Path, required=True, help="scenario file (TOML)")
    _simulation_options(sim)
    sim.set_defaults(handler=cmd_simulate)

    demo = sub.add_parser("demo", help="simulate one inbound call with speech")
    _simulation_options(demo)
    demo.set_defaults(handler=cmd_demo, scenario=None)

    verify = sub.add_parser("verify", help="check the receipt chain, the audit log and the "
                            "recordings' hashes; exit 0 clean, 1 with breaks, 2 usage")
    verify.add_argument("dir", type=Path, nargs="?", metavar="DIR",
                        help="recordings folder (default: the config's storage)")
    verify.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"config file naming the storage (default {DEFAULT_CONFIG_PATH})")
    verify.set_defaults(handler=cmd_verify)

    decrypt = sub.add_parser("decrypt", help="decrypt sealed recordings (.opus.age) with the "
                             "private key, off the appliance; exit 0, 1 when a file failed, "
                             "2 usage")
    decrypt.add_argument("-i", "--identity", type=Path, required=True, metavar="KEYFILE",
                         help="the age key file (age-keygen) with the private key")
    decrypt.add_argument("path", type=Path, metavar="FILE_OR_FOLDER",
                         help="a .opus.age file, or a folder (an export, a copy of the "
                         "storage) whose .opus.age files are all decrypted")
    decrypt.add_argument("-o", "--output", type=Path, metavar="OUT",
                         help="for a file: the .opus to write, or a folder to write it into; "
                         "for a folder: a folder to write into, keeping the layout "
                         "(default: beside each sealed file)")
    decrypt.set_defaults(handler=cmd_decrypt)

    recordings = sub.add_parser("recordings", help="find, export, delete, hold or release "
                                "stored calls (see docs/RECEIPTS.md)")
    rsub = recordings.add_subparsers(metavar="ACTION")
    recordings.set_defaults(handler=lambda args: _usage(recordings))
    find = rsub.add_parser("find", help="list the calls that match")
    _storage_options(find)
    _filter_options(find)
    find.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    find.set_defaults(handler=cmd_find)
    export = rsub.add_parser("export", help="copy calls (recording, receipt, index) to a "
                             "new folder or .zip")
    _storage_options(export)
    _filter_options(export)
    export.add_argument("call_ids", nargs="*", metavar="CALL_ID",
                        help="calls to export (instead of the filters)")
    export.add_argument("-o", "--output", type=Path, metavar="PATH",
                        help="new folder, or a file ending in .zip")
    export.add_argument("--reason", default="", help="why (kept in the audit log; no names "
                        "or numbers)")
    export.set_defaults(handler=cmd_export)
    delete = rsub.add_parser("delete", help="delete calls for good (audited)")
    _storage_options(delete)
    delete.add_argument("call_ids", nargs="+", metavar="CALL_ID")
    delete.add_argument("--reason", default="", help="why (required; kept in the audit log; "
                        "no names or numbers)")
    delete.set_defaults(handler=cmd_delete)
    hold = rsub.add_parser("hold", help="legal hold: retention keeps these calls")
    _storage_options(hold)
    hold.add_argument("call_ids", nargs="+", metavar="CALL_ID")
    hold.add_argument("--reason", default="", help="why (required; kept in the audit log)")
    hold.set_defaults(handler=cmd_hold)
    release = rsub.add_parser("release", help="end a legal hold")
    _storage_options(release)
    release.add_argument("call_ids", nargs="+", metavar="CALL_ID")
    release.add_argument("--reason", default="", help="why (kept in the audit log)")
    release.set_defaults(handler=cmd_release)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_CONFIG


def _storage_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                       help=f"config file naming the storage (default {DEFAULT_CONFIG_PATH})")
    where.add_argument("--storage", type=Path, metavar="DIR",
                       help="recordings folder (instead of the config's storage)")


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--number", help="caller's or dialled number; * and ? are wildcards "
                        "(e.g. '+3120*'); spaces and dashes are ignored")
    parser.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD",
                        help="calls started on or after this day (UTC)")
    parser.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD",
                        help="calls started on or before this day (UTC)")
    parser.add_argument("--line", help="the line's name")


def _simulation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config file (default: the built-in "
                        "simulated config, two lines)")
    parser.add_argument("--storage", type=Path, help="recordings folder "
                        "(default ./linerec-sim, or the config's storage)")
    parser.add_argument("--workdir", type=Path, help="keep the simulator's files (asoundrc, "
                        "FIFOs, line and played audio) in this folder")
    parser.add_argument("--realtime", action="store_true", help="pace the line to the clock")


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(f"linerec: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.path}: OK, {len(config.line)} line(s): "
          + ", ".join(line.name for line in config.line))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from linerec.daemon.doctor import Options, diagnose, report
    from linerec.hw.board import PiHat

    checks = diagnose(args.config, lambda config: PiHat(config.audio.rate),
                      Options(user=args.user))
    if args.json:
        print(json.dumps([check.as_dict() for check in checks], indent=2))
    else:
        print(report(checks))
    return 0 if all(check.ok for check in checks) else 1


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        logger.info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    # `systemctl kill -s USR1 linerec`: every thread's stack to stderr, which systemd puts
    # in the journal, and the daemon runs on. The same for a crash, or the watchdog's
    # SIGABRT.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    faulthandler.enable(all_threads=True)
    return stop


def cmd_run(args: argparse.Namespace) -> int:
    from linerec.daemon.telemetry import MqttInterface
    from linerec.hw.board import PiHat

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    stop = _stop_on_signals()
    notifier = ServiceNotifier()
    events = EventBus([LogSink()])
    hat = PiHat(config.audio.rate)
    recorder = Recorder(config, hat, events)
    mqtt = None
    if config.mqtt is not None:
        mqtt = MqttInterface(config, events, recorder, hat.clock.synchronised,
                             config_path=args.config, apply=recorder.apply_config,
                             test_disclosure=recorder.test_disclosure)
        mqtt.start()
    try:
        outcome = serve(recorder, notifier, stop, finished=recorder.any_engine_done,
                        restart_pending=lambda: mqtt is not None and mqtt.restart_pending,
                        on_ready=lambda: logger.info("GPIO through gpiozero's %s",
                                                     hat.gpio_backend()),
                        checks=StartupChecks(recorder))
    except (HardwareError, StorageError) as exc:
        logger.error("%s", exc)
        return 1
    finally:
        hat.close()
        if mqtt is not None:
            mqtt.stop()
    if outcome is Outcome.FINISHED:
        logger.error("a capture device stopped; exiting so that systemd restarts linerec")
        return 1
    if outcome is Outcome.RESTART:
        logger.warning("device settings changed over MQTT and no line has a call: exiting "
                       "so that systemd starts linerec with them")
        return EXIT_RESTART
    return 0


def _simulation_config(args: argparse.Namespace) -> Config:
    import dataclasses

    from linerec.daemon.simulate import simulated_config

    if args.config is None:
        return simulated_config(args.storage or Path("linerec-sim"))
    config = load_config(args.config)
    return dataclasses.replace(config, storage=args.storage) if args.storage else config


def _simulate(args: argparse.Namespace, scenario_path: Path,
              sinks: Callable[[Config], list[EventSink]]) -> int:
    from linerec.daemon.simulate import RecordingCollector, RestartToApply, run_simulation
    from linerec.hw.sim import SimulatedHat

    try:
        config = _simulation_config(args)
        scenario = load_scenario(scenario_path, [line.name for line in config.line])
        # Composing the line audio decodes every audio file before anything starts.
        hat = SimulatedHat(config, scenario, workdir=args.workdir, realtime=args.realtime)
    except (ConfigError, ScenarioError) as exc:
        print(f"linerec: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"linerec: the simulator cannot use {args.workdir or 'a temporary folder'}: "
              f"{exc}", file=sys.stderr)
        return 1
    collector = RecordingCollector()
    stop = _stop_on_signals()
    try:
        run_simulation(hat, [*sinks(config), collector], stop=stop,
                       config_path=getattr(args, "config", None))
    except ScenarioError as exc:
        print(f"linerec: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (HardwareError, StorageError) as exc:
        print(f"linerec: simulation failed: {exc}", file=sys.stderr)
        return 1
    except RestartToApply:
        print("linerec: device settings changed over MQTT and no line has a call: stopping "
              f"with status {EXIT_RESTART} so that linerec starts again with them",
              file=sys.stderr)
        return EXIT_RESTART
    args.recordings = collector.recordings
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    return _simulate(args, args.scenario, lambda config: [JsonLinesSink(sys.stdout), LogSink()])


def cmd_demo(args: argparse.Namespace) -> int:
    from linerec.daemon.simulate import DemoPrinter, demo_scenario

    # Events go to the screen, readable; the log would only repeat them.
    logging.getLogger("linerec").setLevel(logging.WARNING)
    print("linerec demo: a call received on line1 and a call made on line2, on the simulated "
          "HAT (real ALSA, GPIO, Opus code)")
    status = _simulate(args, demo_scenario(),
                       lambda config: [DemoPrinter(sys.stdout, config.audio.rate)])
    if status == 0:
        for path in args.recordings:
            recording = Path(path).resolve()
            print(f"\nRecording: {recording}")
            print(f"Receipt:   {recording.with_name(recording.name.split('.')[0] + '.json')}")
        if any(path.endswith(SEALED_SUFFIX) for path in args.recordings):
            print("Sealed with [encryption]: open it with `linerec decrypt --identity KEYFILE "
                  "FILE` where the private key is.")
        print("Play it in any Ogg Opus player, e.g. `opusdec --quiet FILE - | aplay` or a browser.")
    return status


class UsageError(Exception):
    """A bad argument or setting: one line for the user, exit status 2."""


_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def _date(option: str, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        if not _DATE.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        hint = ("; an export's destination is -o/--output PATH"
                if option == "--to" and ("/" in value or value.endswith(".zip")) else "")
        raise UsageError(f"{option}: {value!r} is not a date; write it as YYYY-MM-DD, like "
                         f"2026-11-29{hint}") from None


def _storage(args: argparse.Namespace) -> Path:
    if getattr(args, "storage", None) is not None:
        storage = Path(args.storage)
        option = "--storage"
    else:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise UsageError(f"{exc} (or name the recordings folder with --storage DIR)") \
                from None
        storage = config.storage
        # Numbers are compared as the number rules compare them.
        args.country_code = config.numbers.country_code
        option = f"the storage of {args.config}"
    if not storage.is_dir():
        raise UsageError(f"{option}: {storage} is not a folder; pass the recordings folder")
    return storage


def _selection(args: argparse.Namespace) -> archive.CallFilter:
    """Call after _storage, which knows the config's country code."""
    try:
        return archive.CallFilter(number=args.number,
                                  date_from=_date("--from", args.date_from),
                                  date_to=_date("--to", args.date_to), line=args.line,
                                  country_code=getattr(args, "country_code", "31"))
    except ValueError as exc:
        option = "--number" if args.number is not None and "number" in str(exc) else \
            "--from/--to"
        raise UsageError(f"{option}: {exc}") from None


def _recordings_command(action: Callable[[argparse.Namespace], int]) \
        -> Callable[[argparse.Namespace], int]:
    """Usage errors are one line and exit 2; a failed disk operation is one line and 1."""
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except (UsageError, archive.ArchiveError) as exc:
            print(f"linerec: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except OSError as exc:
            print(f"linerec: {exc}", file=sys.stderr)
            return 1
    return run


@_recordings_command
def cmd_verify(args: argparse.Namespace) -> int:
    if args.dir is not None:
        storage = args.dir
        if not storage.is_dir():
            raise UsageError(f"DIR: {storage} is not a folder; pass the recordings folder")
    else:
        storage = _storage(args)
    result = archive.verify(storage)
    for found in result.breaks:
        print(found)
    summary = (f"{storage}: {result.sealed} sealed receipt(s), {result.deleted} deletion(s), "
               f"{result.lines} audit log line(s)")
    if result.breaks:
        print(f"{summary}: {len(result.breaks)} break(s)", file=sys.stderr)
        return 1
    print(f"{summary}: no breaks")
    return 0


@_recordings_command
def cmd_find(args: argparse.Namespace) -> int:
    _selection(args)  # first: a mistyped date is named before the config is read
    storage = _storage(args)
    selection = _selection(args)
    calls = archive.find_calls(storage, selection)
    holds = archive.current_holds(storage)
    rows = [archive.call_summary(call, call.call_id in holds) for call in calls]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        number = row["number"] or f"({row['number_unknown'] or 'unknown'})"
        seconds = None if row["duration_s"] is None else round(row["duration_s"])
        duration = "-" if seconds is None else f"{seconds // 60}:{seconds % 60:02d}"
        flags = " ".join(flag for flag in (
            "HELD" if row["held"] else "",
            row["state"] if row["state"] != "closed" else "",
            "" if row["recording"] else "not recorded") if flag)
        print(f"{row['call_id']}  {row['line']:<8} {row['direction'] or '-':<8} "
              f"{number:<20} {duration:>7}  keep until {row['retention_until'] or '-'}"
              f"{'  ' + flags if flags else ''}")
    print(f"{len(rows)} call(s)", file=sys.stderr)
    return 0


@_recordings_command
def cmd_export(args: argparse.Namespace) -> int:
    selection = _selection(args)  # first: `--to out.zip` is answered with a hint
    if args.output is None:
        raise UsageError("--output PATH is required: a new folder, or a file ending in .zip")
    filters = (args.number, args.date_from, args.date_to, args.line)
    if args.call_ids and any(value is not None for value in filters):
        raise UsageError("give either CALL_IDs or filters (--number, --from, --to, --line), "
                         "not both")
    if not args.call_ids and all(value is None for value in filters):
        raise UsageError("say what to export: CALL_IDs, or filters (--number, --from, --to, "
                         "--line); `linerec recordings find` shows what they select")
    storage = _storage(args)
    selection = _selection(args)  # again, with the config's country code
    if args.call_ids:
        calls = archive.resolve_calls(storage, args.call_ids)
    else:
        calls = archive.find_calls(storage, selection)
        if not calls:
            raise UsageError("no call matches these filters; nothing exported")
    done = archive.export_calls(storage, calls, args.output, reason=args.reason)
    print(f"exported {len(done.call_ids)} call(s), {done.files} file(s) to {done.destination}")
    return 0


@_recordings_command
def cmd_delete(args: argparse.Namespace) -> int:
    storage = _storage(args)
    for done in archive.delete_calls(storage, args.call_ids, args.reason):
        print(f"deleted {done.call_id}: {', '.join(done.files) or 'no files left'}")
    return 0


@_recordings_command
def cmd_hold(args: argparse.Namespace) -> int:
    storage = _storage(args)
    held = archive.hold_calls(storage, args.call_ids, args.reason)
    for call_id in dict.fromkeys(args.call_ids):
        print(f"{'on hold' if call_id in held else 'already on hold'}: {call_id}")
    return 0


@_recordings_command
def cmd_release(args: argparse.Namespace) -> int:
    storage = _storage(args)
    for call_id in archive.release_calls(storage, args.call_ids, args.reason):
        print(f"released: {call_id}")
    return 0


@_recordings_command
def cmd_decrypt(args: argparse.Namespace) -> int:
    from linerec.daemon import encryption

    try:
        identities = encryption.read_identities(args.identity)
    except ValueError as exc:
        raise UsageError(f"--identity: {exc}") from None
    try:
        sealed = encryption.sealed_recordings(args.path)
    except ValueError as exc:
        raise UsageError(f"FILE_OR_FOLDER: {exc}") from None
    failed = 0
    for source in sealed:
        plain_name = source.name.removesuffix(SEALED_SUFFIX)
        if args.output is None:
            target = source.with_name(plain_name)
        elif args.path.is_file():
            target = args.output / plain_name if args.output.is_dir() else args.output
        else:
            target = args.output / source.relative_to(args.path).with_name(plain_name)
        problem = expected = None
        try:
            # The hash first: a file swapped or damaged since it was sealed is not opened.
            expected = encryption.hash_in_receipt(source)
            if expected is not None and file_sha256(source) != expected:
                problem = "differs from the sha256 in its receipt; not decrypted"
            elif target.exists():
                problem = f"{target} exists already; not overwritten"
            else:
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                encryption.open_sealed(source, target, identities)
        except (ValueError, OSError) as exc:
            problem = str(exc)
        if problem:
            failed += 1
            print(f"linerec: {source}: {problem}", file=sys.stderr)
        else:
            checked = "sha256 as in its receipt" if expected else "no receipt beside it to check"
            print(f"{source} -> {target} ({checked})")
    if failed:
        print(f"linerec: {failed} of {len(sealed)} file(s) not decrypted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
