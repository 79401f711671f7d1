"""The `linerec` command: run, check-config, simulate, demo."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from linerec.daemon import __version__
from linerec.daemon.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from linerec.daemon.events import EventBus, EventSink, JsonLinesSink, LogSink
from linerec.daemon.runtime import Recorder, StorageError
from linerec.daemon.supervisor import ServiceNotifier, configure_logging
from linerec.hw.base import HardwareError
from linerec.hw.scenario import ScenarioError, load_scenario

logger = logging.getLogger("linerec.cli")

EXIT_CONFIG = 2
"""Exit status for a bad config or scenario: systemd's RestartPreventExitStatus uses it."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_CONFIG
    configure_logging(args.verbose)
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

    sim = sub.add_parser("simulate", help="run the daemon on the simulated HAT")
    sim.add_argument("--scenario", type=Path, required=True, help="scenario file (TOML)")
    _simulation_options(sim)
    sim.set_defaults(handler=cmd_simulate)

    demo = sub.add_parser("demo", help="simulate one inbound call with speech")
    _simulation_options(demo)
    demo.set_defaults(handler=cmd_demo, scenario=None)
    return parser


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


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        logger.info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return stop


def cmd_run(args: argparse.Namespace) -> int:
    from linerec.daemon.mqtt import MqttEventSink
    from linerec.hw.board import PiHat

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    stop = _stop_on_signals()
    notifier = ServiceNotifier()
    events = EventBus([LogSink()])
    mqtt = None
    if config.mqtt is not None:
        mqtt = MqttEventSink(config.mqtt, config.device_id)
        events.add(mqtt)
        mqtt.start()
    hat = PiHat(config.audio.rate)
    recorder = Recorder(config, hat, events)
    status = 0
    try:
        recorder.start()
        summary = recorder.summary()
        notifier.ready(summary)
        logger.info("ready: %s", summary)
        while not stop.wait(1.0):
            if recorder.any_engine_done():
                logger.error("a capture device stopped; exiting so that systemd restarts us")
                status = 1
                break
            if recorder.summary() != summary:
                summary = recorder.summary()
                notifier.status(summary)
    except (HardwareError, StorageError) as exc:
        logger.error("%s", exc)
        status = 1
    finally:
        notifier.stopping()
        recorder.stop()
        hat.close()
        if mqtt is not None:
            mqtt.stop()
    return status


def _simulation_config(args: argparse.Namespace) -> Config:
    import dataclasses

    from linerec.daemon.simulate import simulated_config

    if args.config is None:
        return simulated_config(args.storage or Path("linerec-sim"))
    config = load_config(args.config)
    return dataclasses.replace(config, storage=args.storage) if args.storage else config


def _simulate(args: argparse.Namespace, scenario_path: Path,
              sinks: Callable[[Config], list[EventSink]]) -> int:
    from linerec.daemon.simulate import RecordingCollector, run_simulation
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
        run_simulation(hat, [*sinks(config), collector], stop=stop)
    except ScenarioError as exc:
        print(f"linerec: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (HardwareError, StorageError) as exc:
        print(f"linerec: simulation failed: {exc}", file=sys.stderr)
        return 1
    args.recordings = collector.recordings
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    return _simulate(args, args.scenario, lambda config: [JsonLinesSink(sys.stdout), LogSink()])


def cmd_demo(args: argparse.Namespace) -> int:
    from linerec.daemon.simulate import DemoPrinter, demo_scenario

    # Events go to the screen, readable; the log would only repeat them.
    logging.getLogger("linerec").setLevel(logging.WARNING)
    print("linerec demo: an inbound call on the simulated HAT (real ALSA, GPIO, Opus code)")
    status = _simulate(args, demo_scenario(),
                       lambda config: [DemoPrinter(sys.stdout, config.audio.rate)])
    if status == 0:
        for path in args.recordings:
            print(f"\nRecording: {Path(path).resolve()}")
            print(f"Receipt:   {Path(path).resolve().with_suffix('.json')}")
        print("Play it in any Ogg Opus player, e.g. `opusdec --quiet FILE - | aplay` or a browser.")
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
