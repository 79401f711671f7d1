"""The recorder: builds lines and engines from the config, starts them in order, stops them
in reverse."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from linerec.audio.pcm import write_wav
from linerec.audio.ring import SampleRing
from linerec.daemon.archive import RETENTION_INTERVAL_S, RetentionSweeper
from linerec.daemon.config import CaptureConfig, Config
from linerec.daemon.disclosure import DisclosureLibrary
from linerec.daemon.encryption import RecordingSealer
from linerec.daemon.engine import CaptureThread, TapEngine
from linerec.daemon.events import EventBus
from linerec.daemon.line import Line
from linerec.daemon.numbers import NumberRules
from linerec.daemon.playback import PlaybackThread
from linerec.daemon.recovery import recover_interrupted
from linerec.daemon.storage_guard import MB, SpaceLevel, StorageGuard
from linerec.hw.base import CaptureStream, Hat, Indicator

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 3.0
"""How long each thread gets to stop; all of them together stay well inside the unit's
TimeoutStopSec, so systemd never has to kill a recorder that is closing its files."""

SERVICE_DEGRADED_BLINK_S = (0.5, 0.5)
"""The service LED blinks evenly while the appliance is degraded; steady means all is well."""

RING_SECONDS = 8
"""Each line's ring holds at least this much audio: the engine may fall this far behind
the capture before audio is lost, less the up to 3 s a line listens for a busy tone after
its disclosure before it starts the recording from the disclosure's end."""


def lock_memory() -> bool:
    """mlockall(MCL_CURRENT | MCL_FUTURE); a warning, not a failure, without the right."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mlockall(1 | 2) != 0:
        error = ctypes.get_errno()
        logger.warning("memory stays pageable: mlockall was refused (%s); allow it with "
                       "LimitMEMLOCK=", os.strerror(error))
        return False
    return True


class Progress(NamedTuple):
    """Counters of one capture device's threads, each only ever rising."""

    captured: int
    """Frames the capture thread copied into the rings."""
    reopen_attempts: int
    """Attempts to reopen the device after it failed."""
    processed: int
    """Frames the engine worked through."""
    engine_turns: int
    """Turns of the engine's loop, audio or not."""

    def advanced_since(self, before: Progress) -> bool:
        """Both threads are alive: the capture delivered audio (or, with its device gone,
        tried again to reopen it), and the engine worked through the audio that came (or,
        with none coming, went round its loop)."""
        captured = self.captured > before.captured
        capture_alive = captured or self.reopen_attempts > before.reopen_attempts
        engine_alive = (self.processed > before.processed if captured
                        else self.engine_turns > before.engine_turns)
        return capture_alive and engine_alive


class StorageError(RuntimeError):
    """The storage folder cannot be used; the message names it."""


def check_storage(storage: Path) -> None:
    """Recordings must be writable before the first call, not found out during it."""
    try:
        storage.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryFile(dir=storage):
            pass
    except OSError as exc:
        raise StorageError(f"storage folder {storage} is not writable: {exc}; fix its "
                           "permissions or set storage in the config") from exc


class Recorder:
    """All lines of the appliance. ``start`` arms every line (devices open, GPIO claimed,
    capture running); ``stop`` closes calls in progress and releases the hardware."""

    def __init__(self, config: Config, hat: Hat, events: EventBus, *,
                 until: int | None = None,
                 retention_interval_s: float = RETENTION_INTERVAL_S) -> None:
        self.config = config
        self.hat = hat
        self.events = events
        self.until = until
        self.retention_interval_s = retention_interval_s
        """Time between retention sweeps (seconds); the first runs at start."""
        self.sweeper: RetentionSweeper | None = None
        self.sealer = (RecordingSealer(config.encryption.recipients)
                       if config.encryption is not None else None)
        """Seals closed recordings to the installer's public keys (``[encryption]``)."""
        self.guard = StorageGuard(config.storage, config.storage_guard, events,
                                  on_low=self._sweep_now)
        self.service_led: Indicator | None = None
        self._service_shown = ""
        self.check_failures: list[str] = []
        self._problem_sources: list[Callable[[], str | None]] = []
        """Start-up checks that failed (``linerec doctor``'s names); the service LED says
        degraded while any did."""
        self.engines: list[TapEngine] = []
        self.players: dict[str, PlaybackThread] = {}
        self.lines: list[Line] = []
        self._closers: list[tuple[str, Callable[[], Any]]] = []
        """What to close, in opening order, each with its capture device's name."""

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self._close_all()
            raise

    def _start(self) -> None:
        check_storage(self.config.storage)
        recover_interrupted(self.config.storage, self.events,
                            recipients=self.sealer.recipients if self.sealer else ())
        # Before the first call can come: a full card turns calls away from the start.
        self.guard.check()
        if self.config.service_led_pin is not None:
            self.service_led = self.hat.service_led(self.config.service_led_pin)
            self._closers.append(("", self._service_led_off))
        audio = self.config.audio
        disclosures = DisclosureLibrary(self.config, audio.rate)
        rules = NumberRules(self.config.numbers)
        for capture_config in self.config.capture:
            line_configs = self.config.lines_on(capture_config)
            if not line_configs:
                continue
            group = capture_config.name
            # The config puts every line of a playback device on one capture device.
            for name in dict.fromkeys(line.playback for line in line_configs):
                device = self.hat.open_playback(self.config.playback_by_name(name), audio)
                self._closers.append((group, device.close))
                self.players[name] = PlaybackThread(name, device)
            stream = self.hat.open_capture(capture_config, audio)
            self._closers.append((group, stream.close))
            rings: dict[int, SampleRing] = {}
            lines: list[Line] = []
            for line_config in line_configs:
                ring = SampleRing(audio.rate * RING_SECONDS)
                rings[line_config.channel] = ring
                output = self.players[line_config.playback].channel(
                    line_config.playback_channel, ring)
                hook = self.hat.hook_sensor(line_config)
                self._closers.append((group, hook.close))
                ringer = self.hat.ring_sensor(line_config)
                self._closers.append((group, ringer.close))
                polarity = self.hat.polarity_sensor(line_config)
                if polarity is not None:
                    self._closers.append((group, polarity.close))
                led = self.hat.recording_led(line_config)
                led.off()
                self._closers.append((group, led.close))
                lines.append(Line(
                    line_config,
                    audio,
                    capture_name=capture_config.name,
                    capture_period=stream.period_frames,
                    capture_buffer=stream.buffer_frames,
                    ring=ring,
                    hook=hook,
                    ringer=ringer,
                    polarity=polarity,
                    led=led,
                    output=output,
                    clock=self.hat.clock,
                    storage=self.config.storage,
                    device_id=self.config.device_id,
                    disclosures=disclosures,
                    rules=rules,
                    events=self.events,
                    storage_full=lambda: self.guard.refusing,
                    sealer=self.sealer,
                ))
            capture = CaptureThread(
                capture_config.name, stream, rings, priority=audio.capture_priority,
                reopen=self._reopener(capture_config))
            # After a reopen the thread holds a new stream: close whichever is current.
            self._closers[self._closers.index((group, stream.close))] = (group, capture.close)
            engine = TapEngine(capture_config.name, capture, lines, clock=self.hat.clock,
                               period=stream.period_frames, events=self.events,
                               until=self.until)
            self.engines.append(engine)
            self.lines.extend(lines)
        if audio.lock_memory:
            lock_memory()
        for player in self.players.values():
            player.start()
        for engine in self.engines:
            engine.capture.start()
            engine.start()
        for engine in self.engines:
            engine.capture.started.wait(STOP_TIMEOUT_S)
            if engine.capture.priority_error:
                logger.warning("capture thread %s keeps normal scheduling: SCHED_FIFO "
                               "priority %d was refused (%s); allow it with LimitRTPRIO=",
                               engine.capture.name, audio.capture_priority,
                               engine.capture.priority_error)
        # Deleting expired calls is slow disk work: its own thread, started last, so that
        # it never delays arming a line nor runs in an engine.
        self.sweeper = RetentionSweeper(self.config.storage, self.events,
                                        self.retention_interval_s)
        self.sweeper.start()
        self.guard.start()
        # What start-up allocated stays put: the collector need not walk it again.
        gc.freeze()
        logger.info("armed %d line(s): %s", len(self.lines),
                    ", ".join(line.name for line in self.lines))

    def _sweep_now(self) -> None:
        if self.sweeper is not None:
            self.sweeper.sweep_now()

    def problems(self) -> list[str]:
        """What is wrong with the appliance now, in a few words each: for STATUS= and the
        service LED."""
        found = [f"{line.name} in fault" for line in self.lines if line.in_fault]
        found += [f"capture {engine.capture_name} lost" for engine in self.engines
                  if engine.capture.device_error is not None]
        if self.guard.level is not SpaceLevel.OK:
            found.append(f"storage {self.guard.level.value} ({self.guard.free // MB} MB free)")
        found += [f"check failed: {name}" for name in self.check_failures]
        found += [problem for source in self._problem_sources if (problem := source())]
        return found

    def watch_problem(self, source: Callable[[], str | None]) -> None:
        """Another part's problem (the MQTT broker's) among ``problems``."""
        self._problem_sources.append(source)

    def show_service_state(self) -> None:
        """The service LED: steady while all is well, blinking while degraded."""
        if self.service_led is None:
            return
        wanted = "blink" if self.problems() else "on"
        if wanted != self._service_shown:
            self._service_shown = wanted
            if wanted == "on":
                self.service_led.on()
            else:
                self.service_led.blink(*SERVICE_DEGRADED_BLINK_S)

    def _service_led_off(self) -> None:
        """Off when linerec is not running: the LED never claims a recorder that is gone."""
        assert self.service_led is not None
        self.service_led.off()
        self.service_led.close()

    def _reopener(self, capture: CaptureConfig) -> Callable[[], CaptureStream]:
        def reopen() -> CaptureStream:
            return self.hat.open_capture(capture, self.config.audio)
        return reopen

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        text = ", ".join(f"{line.name}: {line.state}" for line in self.lines)
        overruns = [f"{name} {count}" for name, count in self.overruns().items() if count]
        if overruns:
            text += f"; overruns: {', '.join(overruns)}"
        problems = self.problems()
        return f"{text}; degraded: {', '.join(problems)}" if problems else text

    def apply_config(self, config: Config) -> None:
        """Take on new call settings: each line changes over when it has no call. Device
        settings (which a caller of this has reported as waiting for a restart) stay."""
        disclosures = DisclosureLibrary(config, self.config.audio.rate)
        rules = NumberRules(config.numbers)
        settings = {line.name: line for line in config.line}
        for line in self.lines:
            if line.name in settings:
                line.reconfigure(settings[line.name], disclosures, rules)

    def test_disclosure(self, line_name: str, direction: str,
                        render_to: Path | None) -> dict[str, Any]:
        """The ``test-disclosure`` command: play a line's disclosure into the line (see
        ``Line.test_disclosure``), or render it to a WAV file. Raises ValueError saying why
        not."""
        line = next((line for line in self.lines if line.name == line_name), None)
        if line is None:
            raise ValueError(f"no line {line_name!r}; lines: "
                             f"{', '.join(line.name for line in self.lines)}")
        if render_to is None:
            prepared = line.test_disclosure(direction)
        else:
            library = DisclosureLibrary(self.config, self.config.audio.rate)
            prepared = library.prepare(line.config.disclosure_for[direction])
            write_wav(render_to, prepared.audio, self.config.audio.rate)
        return {"disclosure": prepared.name, "languages": prepared.languages,
                "duration_s": round(len(prepared.audio) / self.config.audio.rate, 3),
                "sha256": prepared.sha256}

    def free(self) -> bool:
        """No line has a call: a restart now drops nothing."""
        return all(line.call is None for line in self.lines)

    def overruns(self) -> dict[str, int]:
        """Overruns since start-up, per capture device."""
        return {e.capture_name: sum(1 for g in e.capture.gaps if g[2] == "overrun")
                for e in self.engines}

    def progress(self) -> dict[str, Progress]:
        """Per capture device: how far its capture thread and its engine have come."""
        return {e.capture_name: Progress(e.capture.frames_captured, e.capture.reopen_attempts,
                                         e.position, e.turns) for e in self.engines}

    def playback_progress(self) -> dict[str, tuple[int, bool]]:
        """Per playback device: blocks written (``PlaybackThread.blocks``), and whether it
        owes the lines something: periods are waiting for it, or it failed."""
        return {name: (player.blocks, player.failure is not None
                       or any(c.queue for c in player.channels.values()))
                for name, player in self.players.items()}

    def disclosure_failures(self) -> dict[str, int]:
        return {line.name: line.disclosure_failures for line in self.lines}

    def lines_in_fault(self) -> list[str]:
        return [line.name for line in self.lines if line.in_fault]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every engine has ended (the simulator's end, or a device failure)."""
        return all(engine.done.wait(timeout) for engine in self.engines)

    def any_engine_done(self) -> bool:
        return any(engine.done.is_set() for engine in self.engines)

    def stop(self) -> None:
        """Stop in reverse order of start: retention sweep, engines, open calls (and the
        sealing of their recordings), capture, devices.
        Safe after a start that failed half-way."""
        self.guard.stop()
        if self.sweeper is not None:
            self.sweeper.stop()
            self.sweeper.join(timeout=STOP_TIMEOUT_S)
            if self.sweeper.is_alive():
                # A daemon thread between two deletions: each is whole (log line first).
                logger.error("the retention sweep did not stop in %.0f s", STOP_TIMEOUT_S)
        started = [engine for engine in self.engines if engine.ident is not None]
        stuck: set[str] = set()
        for engine in started:
            engine.stop()
        for engine in started:
            engine.join(timeout=STOP_TIMEOUT_S)
            if engine.is_alive():
                # Two threads must never drive one line, and a thread inside alsa-lib must
                # not have its device closed under it: leave that device's calls and
                # devices alone (their recordings stay as .part files).
                logger.error("engine %s did not stop; its calls are left open", engine.name)
                stuck.add(engine.capture_name)
            else:
                engine.shutdown_lines()
        if self.sealer is not None:
            # The calls just closed queued their recordings' sealing and final receipts.
            self.sealer.close()
        for name, player in self.players.items():
            if player.ident is None:
                continue
            player.stop()
            player.join(timeout=STOP_TIMEOUT_S)
            if player.is_alive():
                logger.error("playback thread %s did not stop", player.name)
                stuck.add(self.config.lines_playing_on(
                    self.config.playback_by_name(name))[0].capture)
        for engine in started:
            engine.capture.request_stop()
        self.hat.release_capture()
        for engine in started:
            engine.capture.join(timeout=STOP_TIMEOUT_S)
            if engine.capture.is_alive():
                logger.error("capture thread %s did not stop", engine.capture.name)
                stuck.add(engine.capture_name)
        self._close_all(skip=stuck)

    def _close_all(self, skip: set[str] | None = None) -> None:
        while self._closers:
            group, closer = self._closers.pop()
            if skip and group in skip:
                continue
            try:
                closer()
            except Exception:
                logger.exception("closing %r failed", closer)
