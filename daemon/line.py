"""One telephone line: its call state machine, with the compliance rule in one place.

A line moves through these states, one tick (one capture period) at a time:

    IDLE ──ring──▶ RINGING ──off-hook──▶ DISCLOSING ──disclosure heard──▶ RECORDING
     ▲                                        │                                  │  │
     │                         failed: file, line output,        capture lost (hook │
     │                         loop opened, capture lost,           went unwatched) │
     │                         outbound                                          │  │
     │                                        ▼                                  │  │
     ├─────────── on-hook ─────────── UNRECORDED ◀────────────────────────────────┘  │
     └─────────────────────────────────── on-hook ───────────────────────────────────┘

The compliance rule: no sample is ever written unless that call's disclosure has played
to completion on the line, and nothing captured before it ended is written. It is enforced
in exactly one place, ``_arm_recording``, which needs the ``DisclosureHeard`` proof that
only ``_complete_disclosure`` creates, and starts the recording at the first sample after
the disclosure left the line.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from linerec.audio.pcm import load_line_audio
from linerec.audio.recording import RecordingFile
from linerec.audio.ring import RingOverrun, SampleRing
from linerec.daemon import __version__
from linerec.daemon.config import AudioConfig, LineConfig
from linerec.daemon.events import EventBus, EventKind, iso_ms, make_event
from linerec.daemon.paths import new_call_id, receipt_path, recording_path
from linerec.daemon.playback import OutputChannel, WriteTicket
from linerec.daemon.receipt import write_receipt
from linerec.hw.base import BinaryInput, Clock, HardwareError, Indicator, output_latency

logger = logging.getLogger(__name__)


class LineState(StrEnum):
    IDLE = "idle"
    RINGING = "ringing"
    DISCLOSING = "disclosing"
    RECORDING = "recording"
    UNRECORDED = "unrecorded"
    """Off-hook, call going on, nothing recorded: the disclosure failed or was not possible."""


class HookEdge(Enum):
    OFFHOOK = "offhook"
    ONHOOK = "onhook"


class HookFilter:
    """Debounces the hook input on the audio clock.

    Edges are dated to the first period in which the new level was seen, so a recording
    stops at the sample where the loop opened, not when the on-hook was confirmed. A loop
    break shorter than ``onhook_confirm`` (pulse dialling, hook-flash) does not end a call.
    """

    def __init__(self, *, debounce: int, onhook_confirm: int) -> None:
        self.debounce = debounce
        self.onhook_confirm = onhook_confirm
        self.offhook = False
        """Confirmed state."""
        self._raw = False
        self._raw_since = 0
        self._end = 0

    def update(self, start: int, frames: int, raw_offhook: bool) -> tuple[HookEdge, int] | None:
        """Feed the level seen for samples [start, start + frames); returns a confirmed edge
        and the sample position where it began."""
        if raw_offhook != self._raw:
            self._raw = raw_offhook
            self._raw_since = start
        self._end = start + frames
        held = self._end - self._raw_since
        if not self.offhook and raw_offhook and held >= max(self.debounce, 1):
            self.offhook = True
            return HookEdge.OFFHOOK, self._raw_since
        if self.offhook and not raw_offhook and held >= self.onhook_confirm:
            self.offhook = False
            return HookEdge.ONHOOK, self._raw_since
        return None

    @property
    def loop_open(self) -> bool:
        """The loop has been open for longer than contact bounce, whether or not that is
        confirmed as an on-hook yet."""
        return not self._raw and self._end - self._raw_since >= max(self.debounce, 1)


@dataclass(frozen=True)
class DisclosureHeard:
    """Proof that a call's disclosure played to completion: ``line_end`` is the first
    capture sample after the last disclosure sample left the line output."""

    call_id: str
    line_end: int


@dataclass
class Call:
    call_id: str
    direction: str
    offhook_sample: int
    started_at: datetime
    disclosure_file: Path
    disclosure_sha256: str | None = None
    disclosure: np.ndarray | None = None
    disclosure_first_sample: int | None = None
    """Playback position of the first disclosure sample."""
    disclosure_written: int = 0
    disclosure_ticket: WriteTicket | None = None
    disclosure_last_chunk_end: int = 0
    underruns_at_start: int = 0
    disclosure_line_end: int | None = None
    disclosure_started_at: datetime | None = None
    disclosure_completed_at: datetime | None = None
    disclosure_failure: str | None = None
    recording: RecordingFile | None = None
    recording_first_sample: int | None = None
    recording_next_sample: int = 0
    recording_summary: dict[str, Any] | None = None
    lost_samples: int = 0
    capture_gaps: list[dict[str, Any]] = field(default_factory=list)
    """Audio the capture lost during the recording (overrun, device gone): where, how many
    samples became silence, and why."""

    def heard_by(self, end: int) -> bool:
        """Has the whole disclosure left the line before capture position ``end``?"""
        return self.disclosure_line_end is not None and end >= self.disclosure_line_end


class Line:
    """A line's call state machine, driven by ``tick`` once per capture period."""

    def __init__(
        self,
        config: LineConfig,
        audio: AudioConfig,
        *,
        capture_name: str,
        capture_period: int,
        capture_buffer: int,
        ring: SampleRing,
        hook: BinaryInput,
        ringer: BinaryInput,
        led: Indicator,
        output: OutputChannel,
        clock: Clock,
        storage: Path,
        device_id: str,
        events: EventBus,
    ) -> None:
        self.config = config
        self.name = config.name
        self.state = LineState.IDLE
        self._audio = audio
        self._rate = audio.rate
        self._capture_name = capture_name
        self._ring_buffer = ring
        self._hook_input = hook
        self._ring_input = ringer
        self._led = led
        self._output = output
        self._clock = clock
        self._storage = storage
        self._device_id = device_id
        self._events = events
        ms = self._rate // 1000
        self._hook = HookFilter(
            debounce=config.hook_debounce_ms * ms, onhook_confirm=config.onhook_confirm_ms * ms
        )
        self._output_latency = output_latency(
            capture_period=capture_period, capture_buffer=capture_buffer,
            output_buffer=output.buffer_frames, line_delay=audio.line_delay_frames)
        self._ring_window = round(config.ring_window_s * self._rate)
        self._last_ring: int | None = None
        self._silence = np.zeros(0, dtype=np.int16)
        self._output_failed = False
        self.call: Call | None = None

    # ---- the tick -------------------------------------------------------------------

    def tick(self, start: int, frames: int) -> None:
        """Advance the line over capture samples [start, start + frames)."""
        end = start + frames
        if self._ring_input.is_active:
            self._last_ring = end
        edge = self._hook.update(start, frames, self._hook_input.is_active)

        if self.state in (LineState.IDLE, LineState.RINGING):
            if edge and edge[0] is HookEdge.OFFHOOK:
                self._answer(edge[1], start)
            else:
                ringing = self._last_ring is not None and end - self._last_ring < self._ring_window
                self.state = LineState.RINGING if ringing else LineState.IDLE
        elif self.state is LineState.DISCLOSING:
            # Any loop break, hung up or not, may have cut the notice short for the far end.
            if self._hook.loop_open or (edge and edge[0] is HookEdge.ONHOOK):
                self._fail_disclosure(
                    "the loop opened (on-hook or hook-flash) during the disclosure", end)
                if edge and edge[0] is HookEdge.ONHOOK:
                    self._end_call(edge[1], "onhook")
            elif self.call is not None and self._output.underruns != self.call.underruns_at_start:
                # The output ran dry after the notice began: the far end heard a gap in it.
                self._fail_disclosure("the line output ran dry (underrun) during the disclosure",
                                      end)
            elif self.call is not None and self._disclosure_line_end(self.call) is not None \
                    and self.call.heard_by(end - self._hook.debounce):
                # Waiting one debounce past the end lets a loop break that began just before
                # it show itself as loop_open first.
                self._arm_recording(self._complete_disclosure())
        elif edge and edge[0] is HookEdge.ONHOOK:  # RECORDING or UNRECORDED
            self._end_call(edge[1], "onhook")

        self._play(start, frames)
        if self.state is LineState.RECORDING:
            self._record_until(end)

    def note_capture_gap(self, position: int, lost: int, cause: str) -> None:
        """The capture lost ``lost`` samples at ``position`` (now silence). While it was
        gone nobody watched the hook: if the gap could hide a hang-up (and a new call
        answered since), the disclosure fails and the recording ends where the gap began;
        the call goes on unrecorded until on-hook."""
        call = self.call
        if call is None:
            return
        if call.recording is not None:
            call.capture_gaps.append({"sample": position, "lost_samples": lost,
                                      "cause": cause})
        blind = cause == "device" or lost >= self._hook.onhook_confirm
        if not blind:
            return
        if self.state is LineState.DISCLOSING:
            self._fail_disclosure("the capture was lost during the disclosure, so the line "
                                  "was not watched", position)
        elif self.state is LineState.RECORDING:
            self._stop_recording(position)
            self.state = LineState.UNRECORDED
            self._emit(EventKind.ERROR, position,
                       message=f"the capture was lost for {lost / self._rate:.1f} s; the "
                       "recording ends where it was lost, the call goes on unrecorded")

    def shutdown(self, position: int) -> None:
        """The service stops: close an open recording with what was captured."""
        self._close_call(position, "shutdown")

    def fault(self, position: int, exc: BaseException) -> None:
        """An unexpected error in this line: end the call safely and start over idle."""
        self._emit(EventKind.ERROR, position, message=f"internal error on line {self.name}: {exc}")
        try:
            self._close_call(position, "error")
        except Exception:
            logger.exception("line %s: the call could not be ended cleanly", self.name)
            if self.call is not None and self.call.recording is not None:
                self.call.recording.abandon()  # the .part stays for inspection
            self._led.off()
            self.call = None
            self.state = LineState.IDLE

    def _close_call(self, position: int, reason: str) -> None:
        if self.state is LineState.DISCLOSING:
            self._fail_disclosure(f"the call was closed during the disclosure ({reason})",
                                  position)
        if self.call is not None:
            self._end_call(position, reason)
        self.state = LineState.IDLE

    # ---- call steps -----------------------------------------------------------------

    def _answer(self, offhook_at: int, now: int) -> None:
        inbound = self._last_ring is not None and offhook_at - self._last_ring < self._ring_window
        started = self._clock.timestamp(self._capture_name, offhook_at)
        call = Call(
            call_id=new_call_id(self.name, started),
            direction="inbound" if inbound else "outbound",
            offhook_sample=offhook_at,
            started_at=started,
            disclosure_file=self.config.disclosure,
        )
        self.call = call
        self._emit(EventKind.CALL_STARTED, offhook_at, direction=call.direction)
        self._save_receipt(call, offhook_at)
        if not inbound:
            # On an outbound call the far end hears nothing until it answers, and this
            # version cannot detect the answer yet: a notice played now would be lost, so
            # the call is not recorded.
            self._fail_disclosure(
                "outbound call: answer detection is not available, so the far end could "
                "not hear the disclosure; the call is not recorded", now)
            return
        try:
            # One read: the hash in the receipt is of exactly the audio that played.
            data = call.disclosure_file.read_bytes()
            call.disclosure = load_line_audio(call.disclosure_file, self._rate, data)
        except Exception as exc:  # whatever is wrong with the file, nothing is recorded
            self._fail_disclosure(f"disclosure file cannot be played: {exc}", now)
            return
        if len(call.disclosure) > self.config.disclosure_max_s * self._rate:
            self._fail_disclosure(
                f"disclosure file cannot be played: {call.disclosure_file} is longer than "
                f"disclosure_max_s = {self.config.disclosure_max_s}", now)
            return
        call.disclosure_sha256 = hashlib.sha256(data).hexdigest()
        call.disclosure_first_sample = now
        call.underruns_at_start = self._output.underruns
        call.disclosure_started_at = self._clock.timestamp(self._capture_name, now)
        self.state = LineState.DISCLOSING
        self._emit(EventKind.DISCLOSURE_STARTED, now, file=str(call.disclosure_file),
                   duration_s=round(len(call.disclosure) / self._rate, 3))

    def _complete_disclosure(self) -> DisclosureHeard:
        call = self.call
        assert call is not None and call.disclosure_line_end is not None
        call.disclosure_completed_at = self._clock.timestamp(self._capture_name,
                                                             call.disclosure_line_end)
        self._emit(EventKind.DISCLOSURE_COMPLETED, call.disclosure_line_end)
        return DisclosureHeard(call.call_id, call.disclosure_line_end)

    def _fail_disclosure(self, reason: str, position: int) -> None:
        call = self.call
        assert call is not None
        call.disclosure_failure = reason
        call.disclosure = None
        self.state = LineState.UNRECORDED
        self._emit(EventKind.DISCLOSURE_FAILED, position, reason=reason)

    def _arm_recording(self, heard: DisclosureHeard) -> None:
        """THE compliance rule: recording starts only from proof that this call's disclosure
        was heard, at the first sample after it left the line; nothing earlier is written."""
        call = self.call
        assert call is not None and heard.call_id == call.call_id
        path = recording_path(self._storage, call.call_id, call.started_at)
        try:
            call.recording = RecordingFile(
                path,
                rate=self._rate,
                bitrate=self._audio.bitrate,
                complexity=self._audio.complexity,
                page_interval_s=self._audio.page_interval_s,
                fsync_interval_s=self._audio.fsync_interval_s,
                vendor=f"linerec {__version__}",
                tags={
                    "call_id": call.call_id,
                    "line": self.name,
                    "direction": call.direction,
                    "start_time": iso_ms(call.started_at),
                    "device_id": self._device_id,
                },
            )
        except Exception as exc:
            self.state = LineState.UNRECORDED
            self._emit(EventKind.ERROR, heard.line_end,
                       message=f"cannot create the recording {path}: {exc}")
            return
        call.recording_first_sample = heard.line_end
        call.recording_next_sample = heard.line_end
        call.recording_summary = {"file": path.name, "status": "recording",
                                  "first_sample": heard.line_end}
        self.state = LineState.RECORDING
        self._led.on()
        self._emit(EventKind.RECORDING_STARTED, heard.line_end, file=str(path))
        self._save_receipt(call, heard.line_end)

    def _record_until(self, limit: int) -> None:
        call = self.call
        assert call is not None and call.recording is not None
        parts: list[np.ndarray] = []
        position = call.recording_next_sample
        while position < limit:
            try:
                parts.append(self._ring_buffer.read(position, limit - position))
                position = limit
            except RingOverrun as exc:
                # The engine fell behind the capture: keep the timeline with silence.
                lost = min(exc.oldest, limit) - position
                call.lost_samples += lost
                parts.append(np.zeros(lost, np.int16))
                position += lost
        if not parts:
            return
        samples = parts[0] if len(parts) == 1 else np.concatenate(parts)
        try:
            call.recording.write(samples)
        except OSError as exc:
            recording = call.recording
            self._emit(EventKind.ERROR, limit,
                       message=f"writing the recording failed: {exc}; what was written is in "
                       f"{recording.part_path}")
            recording.abandon()
            call.recording_summary = {"file": recording.part_path.name, "status": "incomplete",
                                      "first_sample": call.recording_first_sample,
                                      "error": str(exc)}
            call.recording = None
            self._led.off()
            self.state = LineState.UNRECORDED
            return
        call.recording_next_sample = limit

    def _stop_recording(self, stop: int) -> None:
        call = self.call
        assert call is not None and call.recording is not None
        first = call.recording_first_sample
        assert first is not None
        self._record_until(stop)
        recording = call.recording
        if recording is None:  # writing failed on the way
            return
        call.recording = None
        try:
            # The on-hook is confirmed up to onhook_confirm_ms after the loop opened; the
            # recording, written meanwhile, is cut back to the sample where it opened.
            size = recording.close(end=stop - first)
        except Exception as exc:
            recording.abandon()
            self._led.off()
            call.recording_summary = {
                "file": recording.part_path.name,
                "status": "incomplete",
                "first_sample": first,
                "error": str(exc),
            }
            self._emit(EventKind.ERROR, stop,
                       message=f"closing the recording {recording.path} failed: {exc}; "
                       f"what was written is in {recording.part_path}")
            return
        self._led.off()
        duration = round(recording.samples / self._rate, 3)
        call.recording_summary = {
            "file": recording.path.name,
            "status": "complete",
            "first_sample": first,
            "end_sample": first + recording.samples,
            "duration_s": duration,
            "bytes": size,
            "codec": "opus",
            "sample_rate": self._rate,
            "bitrate": self._audio.bitrate,
            "lost_samples": call.lost_samples,
            "capture_gaps": call.capture_gaps,
        }
        self._emit(EventKind.RECORDING_STOPPED, first + recording.samples,
                   file=str(recording.path), duration_s=duration, bytes=size)

    def _end_call(self, at: int, reason: str) -> None:
        call = self.call
        assert call is not None
        if call.recording is not None:
            self._stop_recording(at)
        ended = self._clock.timestamp(self._capture_name, at)
        duration = round((at - call.offhook_sample) / self._rate, 3)
        recorded = (call.recording_summary or {}).get("status") == "complete"
        self._emit(EventKind.CALL_ENDED, at, reason=reason, duration_s=duration,
                   recorded=recorded)
        self._save_receipt(call, at, ended=ended, reason=reason)
        self.call = None
        self.state = LineState.IDLE

    # ---- outputs --------------------------------------------------------------------

    def _play(self, start: int, frames: int) -> None:
        """Queue one period for the line output: the disclosure while disclosing, else
        silence, so the output runs in step with the capture clock."""
        call = self.call
        end = start + frames
        ticket = None
        disclosing = (self.state is LineState.DISCLOSING and call is not None
                      and call.disclosure is not None)
        if disclosing:
            assert call is not None and call.disclosure is not None
            chunk = call.disclosure[call.disclosure_written : call.disclosure_written + frames]
            if len(chunk) < frames:
                chunk = np.concatenate([chunk, np.zeros(frames - len(chunk), np.int16)])
            if call.disclosure_written + frames >= len(call.disclosure):
                # The last of the notice: the playback thread notes the capture position
                # when it hands this period to the device.
                ticket = WriteTicket()
                call.disclosure_ticket = ticket
                call.disclosure_last_chunk_end = end
        else:
            if len(self._silence) != frames:
                self._silence = np.zeros(frames, np.int16)
            chunk = self._silence
        try:
            self._output.write(chunk, ticket=ticket, silent=not disclosing)
        except HardwareError as exc:
            if self.state is LineState.DISCLOSING:
                self._fail_disclosure(f"the line output failed: {exc}", start)
            elif not self._output_failed:
                self._emit(EventKind.ERROR, start, message=str(exc))
            self._output_failed = True
            return
        self._output_failed = False
        if disclosing:
            assert call is not None and call.disclosure is not None
            call.disclosure_written = min(len(call.disclosure), call.disclosure_written + frames)

    def _disclosure_line_end(self, call: Call) -> int | None:
        """Where the notice has surely left the line, once the playback thread has handed
        its last period to the device: dated by the capture clock at that moment, not by
        the tick (when the engine runs behind the capture, the tick is early)."""
        ticket = call.disclosure_ticket
        if call.disclosure_line_end is None and ticket is not None \
                and ticket.captured_before_write is not None:
            assert call.disclosure is not None and call.disclosure_first_sample is not None
            chunk_end = call.disclosure_last_chunk_end
            padding = chunk_end - call.disclosure_first_sample - len(call.disclosure)
            given_at = max(ticket.captured_before_write, chunk_end)
            call.disclosure_line_end = given_at - padding + self._output_latency
        return call.disclosure_line_end

    def _emit(self, kind: EventKind, position: int, **fields: Any) -> None:
        call = self.call
        self._events.emit(make_event(
            kind,
            line=self.name,
            call_id=call.call_id if call else None,
            ts=self._clock.timestamp(self._capture_name, position),
            sample=position,
            **fields,
        ))

    def _save_receipt(self, call: Call, at: int, *, ended: datetime | None = None,
                      reason: str | None = None) -> None:
        """Write the call's receipt: while the call is open (``state`` open, so a crash
        leaves one behind for the start-up recovery), and once more when it ends."""
        path = receipt_path(self._storage, call.call_id, call.started_at)
        if call.disclosure_completed_at:
            disclosure_status = "completed"
        elif call.disclosure_failure:
            disclosure_status = "failed"
        else:
            disclosure_status = "playing"
        receipt = {
            "call_id": call.call_id,
            "state": "closed" if ended else "open",
            "line": self.name,
            "device_id": self._device_id,
            "direction": call.direction,
            "started_at": iso_ms(call.started_at),
            "ended_at": iso_ms(ended) if ended else None,
            "end_reason": reason,
            "sample_rate": self._rate,
            "offhook_sample": call.offhook_sample,
            "disclosure": {
                "file": str(call.disclosure_file),
                "sha256": call.disclosure_sha256,
                "first_sample": call.disclosure_first_sample,
                "line_end_sample": call.disclosure_line_end
                if call.disclosure_completed_at else None,
                "started_at": iso_ms(call.disclosure_started_at)
                if call.disclosure_started_at else None,
                "completed_at": iso_ms(call.disclosure_completed_at)
                if call.disclosure_completed_at else None,
                "status": disclosure_status,
                "failure": call.disclosure_failure,
            },
            "recording": call.recording_summary,
            "linerec_version": __version__,
        }
        try:
            write_receipt(path, receipt)
        except OSError as exc:
            self._emit(EventKind.ERROR, at, message=f"cannot write the receipt {path}: {exc}")
