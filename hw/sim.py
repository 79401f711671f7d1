"""The simulated HAT: real alsa-lib on generated PCMs, gpiozero mock pins, a scripted line.

Audio goes through the real ALSA path. Each capture device becomes an alsa-lib ``file``
PCM over ``null`` whose ``infile`` is a FIFO that the simulated line writes; each playback
device (the line outputs) becomes a ``file`` PCM whose output file is a FIFO that the
simulated line reads. The line mixes what the daemon plays back into what it captures, as
the tap and the line output sit on the same pair. Hook and ring are gpiozero MockFactory
pins that the clock drives at their sample positions, so a simulation is deterministic
and, unpaced, faster than real time.

Lock-step: the line writes capture period k only once the engine has begun the tick before
it and what the daemon played then has come out of alsa-lib (its file plugin hands played
audio on once a full buffer has been written after it). What the daemon plays is heard on
the line exactly as late as the daemon allows for (``hw.base.output_latency``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from linerec.audio import g711
from linerec.audio.pcm import write_wav
from linerec.daemon.config import AudioConfig, CaptureConfig, Config, LineConfig, PlaybackConfig
from linerec.hw.alsa import AlsaCapture, AlsaPlayback
from linerec.hw.base import ClockStep, ClockSteps, HardwareError, output_latency
from linerec.hw.board import system_clock_synchronised
from linerec.hw.gpio import GpioInput, GpioLed, drive_input, mock_pin_factory
from linerec.hw.scenario import GpioChange, Scenario

logger = logging.getLogger(__name__)

STALL_TIMEOUT_S = 10.0
PIN_HISTORY_KEPT = 64
"""Level changes a mock pin keeps when the simulation keeps no files."""


def capture_pcm_name(capture: str) -> str:
    return f"linerec_sim_tap_{capture}"


def output_pcm_name(playback: str) -> str:
    return f"linerec_sim_out_{playback}"


class SimulatedClock:
    """Sample positions are the time; each capture position fires the scenario's GPIO
    changes that are due by then. The wall clock is the epoch plus the position, plus the
    scenario's ``clock_step``s up to the latest tick: like the real clock, an earlier
    position asked for after a step gets the new time."""

    def __init__(self, hat: SimulatedHat, rate: int, epoch: datetime,
                 clock_steps: list[tuple[int, float]] | None = None) -> None:
        self._hat = hat
        self._rate = rate
        self._epoch = epoch
        self._ticks = threading.Condition()
        self._started: dict[str, int] = {}
        self._clock_steps = sorted(clock_steps or [])
        self._offset: dict[str, float] = {}
        """Per capture device: seconds the wall clock has been set by, at its latest tick."""
        self._steps = ClockSteps()

    def advance(self, capture: str, position: int) -> None:
        self._hat.fire_gpio(capture, position)
        # The same detection as the real clock's, against the sample position as the
        # monotonic clock.
        offset = sum(seconds for at, seconds in self._clock_steps if at < position)
        self._offset[capture] = offset
        monotonic = position / self._rate
        self._steps.check(capture, position,
                          self._epoch + timedelta(seconds=monotonic + offset), monotonic)
        with self._ticks:
            self._started[capture] = position
            self._ticks.notify_all()

    def wait_for_tick(self, capture: str, position: int, timeout: float) -> bool:
        """Wait until the engine has begun the tick that ends at ``position``."""
        with self._ticks:
            return self._ticks.wait_for(lambda: self._started.get(capture, 0) >= position,
                                        timeout)

    def timestamp(self, capture: str, position: int) -> datetime:
        return self._epoch + timedelta(seconds=position / self._rate
                                       + self._offset.get(capture, 0.0))

    def steps(self, capture: str, since: int) -> list[ClockStep]:
        return self._steps.since(capture, since)

    def synchronised(self) -> bool | None:
        # Simulated time starts from the system clock: it is as good as that.
        return system_clock_synchronised()


class SimulatedHat:
    """The Hat interface on generated ALSA PCMs and mock pins, driven by a scenario."""

    def __init__(self, config: Config, scenario: Scenario, *, workdir: Path | None = None,
                 realtime: bool = False) -> None:
        self.config = config
        self.scenario = scenario
        self.realtime = realtime
        audio = config.audio
        self.rate = audio.rate
        self.period = audio.period_frames
        self.total = scenario.total_samples(self.rate, self.period)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.keep_files = workdir is not None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="linerec-sim-")
            workdir = Path(self._tmp.name)
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.pin_factory = mock_pin_factory()
        self.clock = SimulatedClock(self, self.rate, datetime.now(UTC).replace(microsecond=0),
                                    scenario.clock_steps(self.rate))
        self._line_of = {line.name: line for line in config.line}
        self._pending: dict[str, deque[GpioChange]] = {}
        for change in scenario.gpio_changes(self.rate):
            capture = self._line_of[change.line].capture
            # A deque: minutes of chatter are thousands of changes, taken from the front.
            self._pending.setdefault(capture, deque()).append(change)
        self._gpio_lock = threading.Lock()
        self._far_end = {line.name: scenario.far_end_sources(line.name, self.rate)
                         for line in config.line}
        self._feeders: list[_LineFeeder] = []
        self._capture_fds: dict[str, int] = {}
        self._output_fds: dict[str, int] = {}
        self._outputs: dict[str, AlsaPlayback] = {}
        self._captures: dict[str, AlsaCapture] = {}
        self._capture_faults: dict[str, _CaptureFaults] = {}
        self.broken_outputs: set[str] = set()
        self.silent_outputs: set[str] = set()
        self._write_asoundrc()

    # ---- the Hat interface --------------------------------------------------------

    def open_capture(self, capture: CaptureConfig, audio: AudioConfig) -> AlsaCapture:
        faults = self._capture_faults.setdefault(
            capture.name, _CaptureFaults(self.faults_on(capture.name, "overrun"),
                                         self.faults_on(capture.name, "unplug"),
                                         self.stalls_on(capture.name),
                                         rate=self.rate if self.realtime else 0))
        if time.monotonic() < faults.gone_until:
            # Paced to the clock, an unplugged device stays away for its seconds: the
            # capture thread's reopens fail meanwhile, as on a real HAT.
            raise HardwareError(f"ALSA device {capture_pcm_name(capture.name)!r} (capture "
                                f"{capture.name!r}) cannot be opened: no such device "
                                "(simulated: unplugged)")
        stream = SimulatedCapture(
            dataclasses.replace(capture, device=capture_pcm_name(capture.name)), audio,
            faults)
        self._captures[capture.name] = stream
        return stream

    def faults_on(self, capture: str, kind: str) -> dict[int, int]:
        """Injected faults of a capture device (a scenario's ``overrun`` or ``unplug``
        steps): position -> frames the line loses, both in whole periods."""
        period = self.period
        faults = {}
        for step in self.scenario.steps:
            if step.do == kind and self._line_of[step.line].capture == capture:
                at = round(step.at * self.rate) // period * period
                frames = (int(step.params["frames"]) if kind == "overrun"
                          else round(float(step.params["seconds"]) * self.rate))
                faults[at] = -(-frames // period) * period
        return faults

    def stalls_on(self, capture: str) -> dict[int, float]:
        """A scenario's ``stall`` steps on a capture device: position (a whole period) ->
        seconds of wall-clock time the device then delivers nothing, without failing."""
        return {round(step.at * self.rate) // self.period * self.period:
                float(step.params["seconds"])
                for step in self.scenario.steps
                if step.do == "stall" and self._line_of[step.line].capture == capture}

    def gaps_on(self, capture: str) -> dict[int, int]:
        """Where the simulated line's audio never reaches the daemon."""
        return {**self.faults_on(capture, "overrun"), **self.faults_on(capture, "unplug")}

    def open_playback(self, playback: PlaybackConfig, audio: AudioConfig) -> AlsaPlayback:
        output = SimulatedPlayback(
            dataclasses.replace(playback, device=output_pcm_name(playback.name)),
                                audio)
        self._outputs[playback.name] = output
        return output

    def hook_sensor(self, line: LineConfig) -> GpioInput:
        return GpioInput(line.hook_pin, active_high=line.hook_active_high,
                         name=f"{line.name} hook", pin_factory=self.pin_factory)

    def ring_sensor(self, line: LineConfig) -> GpioInput:
        return GpioInput(line.ring_pin, active_high=line.ring_active_high,
                         name=f"{line.name} ring", pin_factory=self.pin_factory)

    def polarity_sensor(self, line: LineConfig) -> GpioInput | None:
        if line.polarity_pin is None:
            return None
        return GpioInput(line.polarity_pin, active_high=line.polarity_active_high,
                         name=f"{line.name} polarity", pin_factory=self.pin_factory)

    def recording_led(self, line: LineConfig) -> GpioLed:
        return GpioLed(line.led_pin, name=f"{line.name} LED", pin_factory=self.pin_factory)

    def service_led(self, pin: int) -> GpioLed:
        return GpioLed(pin, name="service LED", pin_factory=self.pin_factory)

    def release_capture(self) -> None:
        """Closing the FIFO's only writer ends the capture thread's blocked read."""
        for feeder in self._feeders:
            feeder.stop()
        for feeder in self._feeders:
            # It waits at most 0.1 s at a time, so it sees the stop before its next write.
            feeder.join(timeout=STALL_TIMEOUT_S)
        for fd in self._capture_fds.values():
            os.close(fd)
        self._capture_fds.clear()

    def close(self) -> None:
        self.release_capture()
        for fd in self._output_fds.values():
            os.close(fd)
        self._output_fds.clear()
        self.pin_factory.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # ---- driving the simulated world ------------------------------------------------

    def fire_gpio(self, capture: str, position: int) -> None:
        with self._gpio_lock:
            pending = self._pending.get(capture)
            while pending and pending[0].sample < position:
                change = pending.popleft()
                line = self._line_of[change.line]
                pin, active_high = {
                    "hook": (line.hook_pin, line.hook_active_high),
                    "ring": (line.ring_pin, line.ring_active_high),
                    "polarity": (line.polarity_pin, line.polarity_active_high),
                }[change.input]
                if pin is not None:  # a HAT without a polarity input does not see it
                    drive_input(self.pin_factory, pin, high=change.active == active_high)
            if not self.keep_files:
                self._forget_pin_history()

    def _forget_pin_history(self) -> None:
        """gpiozero's mock pins keep every level change (for tests that read them back);
        a long simulation that keeps no files has no reader for them, and a HAT's real pins
        keep nothing, so the history is dropped rather than grown for every call."""
        for pin in list(self.pin_factory.pins.values()):
            if len(pin.states) > PIN_HISTORY_KEPT:
                pin.clear_states()

    def break_line_output(self, line: str) -> None:
        """Fault injection: the line output's ALSA PCM goes away (as when the HAT's codec
        resets), so the daemon's next write fails inside alsa-lib/pyalsaaudio. The line
        then hears nothing from the daemon."""
        playback = self._line_of[line].playback
        self.broken_outputs.add(playback)
        self._outputs[playback].close()

    def silence_line_output(self, line: str) -> None:
        """Fault injection: the line output plays, but nothing of it reaches the line (a
        transformer or jumper left unconnected). The daemon sees no error at all."""
        self.silent_outputs.add(line)

    def start_lines(self) -> None:
        """Start feeding each capture device; call after the daemon opened its devices."""
        for capture in self.config.capture:
            lines = self.config.lines_on(capture)
            if not lines:
                continue
            feeder = _LineFeeder(self, capture, lines)
            self._feeders.append(feeder)
            feeder.start()

    def failure(self) -> BaseException | None:
        return next((f.failure for f in self._feeders if f.failure), None)

    def played(self, line: str) -> np.ndarray:
        """Everything the daemon played into a line so far."""
        for feeder in self._feeders:
            if any(config.name == line for config in feeder.lines):
                return feeder.played(line)
        raise KeyError(line)

    def save_line_audio(self) -> None:
        """Write what each line carried and what was played into it, for inspection."""
        for feeder in self._feeders:
            for index, line in enumerate(feeder.lines):
                write_wav(self.workdir / f"{line.name}.played.wav", self.played(line.name),
                           self.rate)
                write_wav(self.workdir / f"{line.name}.line.wav",
                           feeder.line_audio[:, index][: feeder.written], self.rate)

    # ---- set-up ---------------------------------------------------------------------

    def _write_asoundrc(self) -> None:
        # Opening each FIFO O_RDWR here never blocks, and keeps both ends open whatever order
        # alsa-lib opens them in; closing the capture FIFO's fd is what ends a blocked read.
        entries = []
        for capture in self.config.capture:
            fifo = self._fifo(f"capture-{capture.name}.fifo")
            self._capture_fds[capture.name] = os.open(fifo, os.O_RDWR)
            entries.append(_file_pcm(capture_pcm_name(capture.name), "/dev/null", infile=fifo))
        for playback in self.config.playback:
            fifo = self._fifo(f"output-{playback.name}.fifo")
            self._output_fds[playback.name] = os.open(fifo, os.O_RDWR)
            entries.append(_file_pcm(output_pcm_name(playback.name), fifo))
        asoundrc = self.workdir / "asoundrc"
        asoundrc.write_text("\n".join(entries) + "\n", encoding="utf-8")
        # alsa-lib reads its configuration when the first PCM opens, after this.
        os.environ["ALSA_CONFIG_PATH"] = f"/usr/share/alsa/alsa.conf:{asoundrc}"

    def _fifo(self, name: str) -> Path:
        path = self.workdir / name
        if path.exists():
            path.unlink()
        os.mkfifo(path, 0o600)
        return path


class SimulatedPlayback(AlsaPlayback):
    """The real ALSA playback adapter. The simulated device has no clock of its own, so
    there is no backlog to catch up with: silence the playback thread would drop is
    played, and the line's timeline stays whole (what is dropped is silence either way)."""

    def skip(self, frames: np.ndarray) -> None:
        self.write(frames)


@dataclass
class _CaptureFaults:
    """A capture device's injected faults and where it is, kept across reopens."""

    overruns: dict[int, int]
    unplugs: dict[int, int]
    stalls: dict[int, float]
    rate: int = 0
    """Set when the line is paced to the clock: an unplugged device is then gone for its
    seconds of wall-clock time."""
    gone_until: float = 0.0
    """Monotonic time until which the unplugged device cannot be reopened."""
    position: int = 0
    lost_while_gone: int = 0
    consumed: int = 0
    """Frames the reader has taken out of the FIFO (what the line skipped never went in)."""
    xruns: dict[int, int] = dataclasses.field(default_factory=dict)
    """Overruns of the device's own clock (paced to the clock only): ``consumed`` at which
    the line's audio jumps -> frames lost. The line registers one before it writes the
    frames after the gap, and the reader looks it up after its read by what it had
    consumed before: a reader already blocked in that read gets it all the same."""


class SimulatedCapture(AlsaCapture):
    """The real ALSA capture adapter with the simulated HAT's faults injected where the
    line skipped audio: an overrun is reported with the frames it lost, as the adapter does
    on a real device after -EPIPE; an unplugged device fails its read, and the stream that
    reopens it reports the frames lost meanwhile. (On a real device both losses are
    measured by the monotonic clock.)"""

    def __init__(self, capture: CaptureConfig, audio: AudioConfig,
                 faults: _CaptureFaults) -> None:
        super().__init__(capture, audio)
        self._faults = faults

    def read_period(self) -> np.ndarray:
        faults = self._faults
        gone = faults.unplugs.pop(faults.position, 0)
        if gone:
            faults.position += gone
            faults.lost_while_gone = gone
            if faults.rate:
                faults.gone_until = time.monotonic() + gone / faults.rate
            raise HardwareError(f"capture device {self.name!r} was unplugged (simulated)")
        hang = faults.stalls.pop(faults.position, 0.0)
        if hang:
            # A hung driver: the read neither returns nor fails for a while. No audio is
            # lost (the line waits in lock-step); the watchdog must notice the silence.
            time.sleep(hang)
        lost = faults.overruns.pop(faults.position, 0)
        if lost:
            self.overruns += 1
            self._lost += lost
            faults.position += lost
        consumed = faults.consumed
        frames = super().read_period()
        faults.consumed += len(frames)
        # Looked up after the read: the line may have fallen behind while this read waited.
        lost = faults.xruns.pop(consumed, 0)
        if lost:
            self.overruns += 1
            self._lost += lost
            faults.position += lost
        faults.position += len(frames)
        return frames

    def measure_gap_from(self, last_read_at: float) -> None:
        self._lost += self._faults.lost_while_gone
        self._faults.lost_while_gone = 0


class _LineFeeder(threading.Thread):
    """The telephone lines of one capture device: writes what they carry, period by period,
    with the echo of what the daemon plays into them."""

    def __init__(self, hat: SimulatedHat, capture: CaptureConfig,
                 lines: tuple[LineConfig, ...]) -> None:
        super().__init__(name=f"sim-line-{capture.name}", daemon=True)
        self.hat = hat
        self.capture = capture
        self.lines = lines
        self.failure: BaseException | None = None
        # What the daemon played, from sample _played_base on: everything when the files are
        # kept, else only the last few seconds the echo needs (a long soak stays small).
        self._played = {line.name: np.zeros(min(hat.total, 8 * hat.rate), dtype=np.int16)
                        for line in lines}
        self._played_base = {line.name: 0 for line in lines}
        self._played_frames = {line.name: 0 for line in lines}
        self._keep_played = hat.keep_files
        self._carry = {line.playback: b"" for line in lines}
        self.line_audio = np.zeros((hat.total if hat.keep_files else 0, len(lines)),
                                   dtype=np.int16)
        self.written = 0
        self._stopping = False
        self._stalls = sum(hat.stalls_on(capture.name).values())
        """Injected stalls: the daemon may read nothing for this long on top."""

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        try:
            self._run()
        except HardwareError as exc:
            self.failure = exc
        except Exception as exc:
            logger.exception("the simulated line %s failed", self.capture.name)
            self.failure = HardwareError(f"the simulated line {self.capture.name} failed: {exc}")

    def _run(self) -> None:
        hat = self.hat
        period = hat.period
        fd = hat._capture_fds[self.capture.name]
        # Heard on the line as late as the daemon allows for.
        capture_buffer = hat._captures[self.capture.name].buffer_frames
        buffers = {line.name: hat._outputs[line.playback].buffer_frames for line in self.lines}
        delays = {
            name: output_latency(capture_period=period, capture_buffer=capture_buffer,
                                 output_buffer=buffer,
                                 line_delay=hat.config.audio.line_delay_frames)
            for name, buffer in buffers.items()
        }
        faults = hat._capture_faults[self.capture.name]
        starved = None
        if hat.realtime:
            starved = _Starvation(self.capture.name, capture_buffer / hat.rate)
            starved.start()
        try:
            self._feed(faults, starved, fd, buffers, delays)
        finally:
            if starved is not None:
                starved.stop()

    def _feed(self, faults: _CaptureFaults, starved: _Starvation | None, fd: int,
              buffers: dict[str, int], delays: dict[str, int]) -> None:
        hat = self.hat
        period = hat.period
        started = time.monotonic()
        gaps = hat.gaps_on(self.capture.name)
        start = 0
        delivered = 0
        """End of the last period written: the daemon can have ticked up to here."""
        fed = 0
        """Frames written into the FIFO: where the reader meets a gap in the line's audio."""
        while start < hat.total:
            if self._stopping:
                return
            if start in gaps:
                # An injected overrun: these frames never reach the daemon.
                start += gaps.pop(start)
                continue
            if hat.realtime:
                lag = started + start / hat.rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            block = np.zeros((period, self.capture.channels), dtype=np.int16)
            # Lock-step: the engine has begun the previous tick, and what it played then has
            # come out (alsa-lib hands it on one output buffer later), before this period
            # goes in. So the capture never runs more than a period ahead of the engine.
            # After an injected overrun the daemon can only tick through the gap once this
            # period is in, so the wait is for what was delivered, not for ``start``.
            if delivered and not self._wait_for_engine(delivered):
                return
            if starved is not None:
                start += self._overrun(faults, fed, start, starved)
            for index, line in enumerate(self.lines):
                played = delivered - buffers[line.name]
                self._read_played(line.name, played)
                echo = self._echo(line.name, start - delays[line.name], period, played)
                mixed = echo
                for at, source in hat._far_end[line.name]:
                    lo, hi = max(start, at), min(start + period, at + len(source))
                    if lo < hi:
                        mixed[lo - start : hi - start] += source[lo - at : hi - at]
                samples = np.clip(np.round(mixed), -32768, 32767).astype(np.int16)
                block[:, line.channel] = samples
                if hat.keep_files:
                    self.line_audio[start : start + period, index] = samples
            if self.capture.format == "S16_LE":
                os.write(fd, block.astype("<i2").tobytes())
            else:
                os.write(fd, g711.encode(block, self.capture.format).tobytes())
            fed += period
            self.written = start + period
            start += period
            delivered = start

    def _overrun(self, faults: _CaptureFaults, fed: int, start: int,
                 starved: _Starvation) -> int:
        """The device's clock does not wait: when the process (and with it the daemon's
        capture thread) could not run for more than a capture buffer, the device has
        overrun, and lost everything from its last read to the end of the starvation, the
        buffer's frames too (ALSA's re-prepare drops them; AlsaCapture's clock counts them).
        Whole periods, so that the line stays on the periods the scenario's faults are at.
        The gap is registered before the frames after it go in. Returns the frames skipped.

        The engine falling behind is no overrun: on a HAT the ring holds seconds, and this
        line waits for the engine only for the simulation's own lock-step."""
        seconds = starved.take()
        period = self.hat.period
        # At least the scenario's last period still comes, so that the engine reaches its end.
        lost = min(round(seconds * self.hat.rate) // period * period,
                   self.hat.total - period - start)
        if lost <= 0:
            return 0
        faults.xruns[fed] = faults.xruns.get(fed, 0) + lost
        logger.info("the simulated capture %s overran: the process could not run for %.3f s "
                    "before sample %d; %d frames lost", self.capture.name, seconds, start, lost)
        return lost

    def _wait_for_engine(self, position: int) -> bool:
        waited = 0.0
        while not self.hat.clock.wait_for_tick(self.capture.name, position, 0.1):
            if self._stopping:
                return False
            waited += 0.1
            if waited >= STALL_TIMEOUT_S + self._stalls:
                raise HardwareError(f"simulated line {self.capture.name}: the daemon read "
                                    f"nothing for {STALL_TIMEOUT_S} s (at sample {position})")
        return True

    def _echo(self, line: str, first: int, count: int, available: int) -> np.ndarray:
        """Played samples [first, first + count) as heard on the line: zero before 0, and
        past ``available`` (only right after an injected overrun, when the daemon has not
        yet played through the gap)."""
        out = np.zeros(count, dtype=np.float64)
        lo, hi = max(first, 0), min(first + count, available)
        if hi <= lo or self.hat._line_of[line].playback in self.hat.broken_outputs \
                or line in self.hat.silent_outputs:
            return out
        self._read_played(line, hi)
        base = self._played_base[line]
        out[lo - first : hi - first] = self._played[line][lo - base : hi - base]
        return out

    def played(self, line: str) -> np.ndarray:
        """What the daemon played (all of it only when the hat keeps its files)."""
        return self._played[line][: self._played_frames[line] - self._played_base[line]]

    def _read_played(self, line: str, frames: int) -> None:
        """Read the line's playback device until this line has ``frames`` played samples;
        the device's other channels go to the lines they serve."""
        playback = self.hat.config.playback_by_name(self.hat._line_of[line].playback)
        fd = self.hat._output_fds[playback.name]
        served = [(other.name, other.playback_channel) for other in self.lines
                  if other.playback == playback.name]
        frame_bytes = 2 * playback.channels
        waited = 0.0
        while self._played_frames[line] < frames:
            if playback.name in self.hat.broken_outputs or self._stopping:
                return
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                waited += 0.1
                if waited < STALL_TIMEOUT_S:
                    continue
                raise HardwareError(
                    f"simulated line {line}: the daemon played nothing for {STALL_TIMEOUT_S} s "
                    f"(have {self._played_frames[line]} of {frames} frames)")
            data = self._carry[playback.name] + os.read(fd, 16384)
            whole = len(data) - len(data) % frame_bytes
            self._carry[playback.name] = data[whole:]
            block = np.frombuffer(data[:whole], dtype="<i2").reshape(-1, playback.channels)
            for name, channel in served:
                self._keep(name, block[:, channel])

    def _keep(self, line: str, samples: np.ndarray) -> None:
        base = self._played_base[line]
        have = self._played_frames[line] - base
        buf = self._played[line]
        if have + len(samples) > len(buf):
            if self._keep_played:
                buf = np.concatenate([buf, np.zeros(max(len(buf), len(samples)), np.int16)])
            else:
                # Keep the newest half: far more than the echo delay looks back.
                drop = have - len(buf) // 2
                buf[: have - drop] = buf[drop:have]
                have -= drop
                self._played_base[line] = base + drop
            self._played[line] = buf
        buf[have : have + len(samples)] = samples
        self._played_frames[line] = self._played_base[line] + have + len(samples)


class _Starvation(threading.Thread):
    """A thread that only sleeps and wakes, paced to the clock: a wake-up later than the
    capture buffer lasts is a time the process could not run (stopped, starved of the CPU,
    or of the interpreter lock), and the daemon's capture thread, which needs both to copy
    a period, could not have read the device either."""

    TICK_S = 0.005

    def __init__(self, capture: str, buffer_s: float) -> None:
        super().__init__(name=f"sim-clock-{capture}", daemon=True)
        self._buffer_s = buffer_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._starved = 0.0

    def run(self) -> None:
        last = time.monotonic()
        while not self._stopping.wait(self.TICK_S):
            now = time.monotonic()
            if now - last > self._buffer_s:
                with self._lock:
                    self._starved += now - last
            last = now

    def take(self) -> float:
        """Seconds starved since the last call (each longer than a capture buffer)."""
        with self._lock:
            starved, self._starved = self._starved, 0.0
        return starved

    def stop(self) -> None:
        self._stopping.set()


def _file_pcm(name: str, output: Path | str, *, infile: Path | None = None) -> str:
    """An alsa-lib file PCM over null: unpaced, reading capture data from ``infile``."""
    source = f' infile "{infile}"' if infile else ""
    return f'pcm.{name} {{ type file slave.pcm "null" file "{output}"{source} format "raw" }}'
