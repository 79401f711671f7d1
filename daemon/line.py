"""One telephone line: its call state machine, with the compliance rule in one place.

A line moves through these states, one tick (one capture period) at a time:

    IDLE ──ring──▶ RINGING ──off-hook──▶ ANSWERING ────────┐ (inbound: notice at off-hook)
     │                          (dial tone: outbound)      ▼
     └──off-hook, no ring──▶ DIALLING ──far end answers──▶ DISCLOSING ──heard──▶ RECORDING
                               │  (outbound: digits,       │                        │
                               │   ringback, polarity)     │ failed: file, output,  │ capture
                               │                           │ not heard, loop open,  │ lost
                               │ no answer, busy,          │ busy tone              │
                               ▼ never-record number       ▼                        ▼
                             UNRECORDED ◀───────────────────────────────────────────┘
    Every off-hook state ends the call on on-hook (back to IDLE), or on a held busy tone:
    the far end is gone while the handset stays off-hook (CLEARED until on-hook).

The compliance rule: no sample is ever written unless that call's disclosure has played
to completion on the line and the tap heard it there, and nothing captured before it
ended is written. It is enforced in exactly one place, ``_arm_recording``, which needs
the ``DisclosureHeard`` proof that only ``_complete_disclosure`` creates, and starts the
recording at the first sample after the disclosure left the line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from linerec.audio.callerid import CallerId, DtmfClipParser, FskCallerIdDecoder
from linerec.audio.dtmf import DtmfDetector
from linerec.audio.pcm import AudioFileError
from linerec.audio.progress import CallProgress
from linerec.audio.recording import RecordingFile
from linerec.audio.ring import RingOverrun, SampleRing
from linerec.daemon import __version__
from linerec.daemon.config import AudioConfig, LineConfig
from linerec.daemon.disclosure import DisclosureLibrary, EchoCheck, PreparedDisclosure
from linerec.daemon.encryption import RecordingSealer, Sealed, sealed_path
from linerec.daemon.events import EventBus, EventKind, iso_ms, journal_fields, make_event
from linerec.daemon.numbers import NEVER_RECORD, STORAGE_FULL, NumberRules
from linerec.daemon.paths import SEALED_SUFFIX, new_call_id, receipt_path, recording_path
from linerec.daemon.playback import OutputChannel, WriteTicket
from linerec.daemon.receipt import file_sha256, seal_receipt, write_receipt
from linerec.daemon.storage_guard import storage_state
from linerec.hw.base import BinaryInput, Clock, HardwareError, Indicator, output_latency

logger = logging.getLogger(__name__)

RECEIPT_SCHEMA = "linerec-receipt/1"
FAULT_AFTER_FAILURES = 3
"""A line whose disclosure fails this many calls in a row (for reasons of the line, not of
the caller) is in fault: its LED blinks until a disclosure is heard again."""
FAULT_BLINK_S = (0.2, 0.8)
"""A short flash each second: this line is in fault."""
STORAGE_FULL_BLINK_S = (1.0, 1.0)
"""Slow, even blinking: the storage is full, calls are not recorded."""
SILENT_OUTPUT_SHARE = 0.3
"""A disclosure heard at under this share of verify_min_score did not reach the line at all
(a silent output scores about 0.01); above it, it was there but drowned."""
CALLER_ID_KEEP_S = 10.0
"""A caller id with no ringing after it is forgotten after this long (seconds)."""
RING_CONFIRM_MS = 100
"""The ring input must hold this long, with no edge, to be ringing. The shortest ring burst
of any cadence is 0.2 s or more (the UK's double ring 0.4 s); a shorter one is a spike or a
chattering detector, which must not make an off-hook after it an inbound call."""
PULSE_BREAK_MAX_MS = 85
"""A loop break up to this long is a dial pulse (60 ms at 10 pulses/s); a longer one that
is shorter than an on-hook is a hook-flash."""
PULSE_DIGIT_GAP_MS = 300
"""The loop closed this long after a pulse ends the digit (pulses are 40 ms apart)."""
DIAL_TONE_CHECK_S = 0.7
"""An inbound off-hook listens this long (from the confirmed off-hook) for dial tone before
the notice plays: dial tone means the caller had given up and the office is making a call
instead. Exchanges give dial tone within a few hundred milliseconds; one that is later is
caught after the disclosure (a progress tone there fails the call)."""
DIAL_TONE_MIN_S = 0.25
"""A tone held this long, to the end of the check, is dial tone; a high voice is not."""
RINGBACK_MIN_S, RINGBACK_MAX_S = 0.3, 1.5
"""A tone burst after the last dialled digit this long is ringback, even one cut short
by the far end answering."""
QUIET_AFTER_S = 0.75
"""After the disclosure has left the line, this long without a call progress tone shows the
far end did not hang up during it (busy is 0.5 s on / 0.5 s off)."""
BUSY_DECIDE_S = 3.0
"""With a tone after the disclosure, how long to wait for a busy cadence to show (three
bursts) before the recording starts anyway. The ring holds the audio meanwhile."""


class LineState(StrEnum):
    IDLE = "idle"
    RINGING = "ringing"
    ANSWERING = "answering"
    """Off-hook after ringing: listening a moment for dial tone before the notice plays."""
    DIALLING = "dialling"
    """Outbound: off-hook without ringing; waiting for the far end to answer."""
    DISCLOSING = "disclosing"
    RECORDING = "recording"
    UNRECORDED = "unrecorded"
    """Off-hook, call going on, nothing recorded: the disclosure failed, was not possible
    or a number rule says no."""
    CLEARED = "cleared"
    """The far end hung up (busy tone) while the handset stays off-hook."""


class HookEdge(Enum):
    OFFHOOK = "offhook"
    ONHOOK = "onhook"
    BREAK = "break"
    """The loop opened and closed again before an on-hook: a dial pulse or a hook-flash."""


@dataclass(frozen=True)
class HookEvent:
    edge: HookEdge
    at: int
    """Sample position where the new level began."""
    length: int = 0
    """For a break: how long the loop was open (samples)."""
    unsettled: bool = False
    """An on-hook taken because the input never held a level for the debounce over
    ``onhook_confirm``: whether the loop was open cannot be told."""


class HookFilter:
    """Debounces the hook input on the audio clock, in two stages.

    First the level must hold for ``debounce`` with no edge at all (the input's edge count
    tells of a flip and back between two reads: chatter that sampling once a period would
    alias into a level held). Then the debounced level is timed: off-hook at once, on-hook
    once the loop stays open for ``onhook_confirm``; an opening shorter than that is a loop
    break (pulse dialling, hook-flash), which does not end a call. Chatter shorter than the
    debounce never reaches the second stage, so it neither starts a call nor ends one, nor
    delays or re-dates an on-hook.

    Chatter that never stops for a debounce (hum on a wet pair, a worn switch) would keep the
    last level for ever: a caller's on-hook would go unseen and the next caller would be
    recorded in the first one's call, without a notice. So off-hook, an input that has not
    settled for ``onhook_confirm`` is taken for an on-hook where the unrest began (fail
    closed: the call and its recording end there, ``unsettled``); a call after it must
    settle off-hook first, and is then a new call with its own disclosure.

    Edges are dated to where the new level began to hold (after its contact bounce), so a
    recording stops at the sample where the loop opened, not when the on-hook was confirmed.
    """

    def __init__(self, *, debounce: int, onhook_confirm: int) -> None:
        self.debounce = debounce
        self.onhook_confirm = onhook_confirm
        self.offhook = False
        """Confirmed state."""
        self._raw = False
        self._raw_since = 0
        """Since when the input has held its level without an edge."""
        self._level = False
        """Debounced level: the raw level once it held for the debounce."""
        self._level_since = 0
        self._unsettled_since: int | None = None
        """Where the input began changing without holding a level for the debounce."""
        self._end = 0

    def update(self, start: int, frames: int, raw_offhook: bool,
               changed: bool = False) -> HookEvent | None:
        """Feed the level seen for samples [start, start + frames), and whether the input
        had edges since the last update; returns a confirmed edge or a loop break that just
        ended."""
        if raw_offhook != self._raw or changed:
            self._raw = raw_offhook
            self._raw_since = start
            if self._unsettled_since is None:
                self._unsettled_since = start
        self._end = start + frames
        settled = self._end - self._raw_since >= max(self.debounce, 1)
        if settled:
            self._unsettled_since = None
        elif self.offhook and self._unsettled_since is not None \
                and self._end - self._unsettled_since >= self.onhook_confirm:
            self.offhook = self._level = False
            self._level_since = self._unsettled_since
            return HookEvent(HookEdge.ONHOOK, self._unsettled_since, unsettled=True)
        event = None
        if self._raw != self._level and settled:
            if self._raw and self.offhook:
                event = HookEvent(HookEdge.BREAK, self._level_since,
                                  self._raw_since - self._level_since)
            self._level = self._raw
            self._level_since = self._raw_since
        if not self.offhook and self._level:
            self.offhook = True
            return HookEvent(HookEdge.OFFHOOK, self._level_since)
        if self.offhook and not self._level \
                and self._end - self._level_since >= self.onhook_confirm:
            self.offhook = False
            return HookEvent(HookEdge.ONHOOK, self._level_since)
        return event

    @property
    def loop_open(self) -> bool:
        """The loop has been open for longer than contact bounce, whether or not that is
        confirmed as an on-hook yet."""
        return not self._level


class PulseDialling:
    """Counts dial pulses (loop breaks) into digits: ten pulses are 0."""

    def __init__(self, rate: int) -> None:
        self._break_max = PULSE_BREAK_MAX_MS * rate // 1000
        self._digit_gap = PULSE_DIGIT_GAP_MS * rate // 1000
        self._pulses = 0
        self._last_end = 0

    def loop_break(self, at: int, length: int) -> None:
        if length <= self._break_max:
            self._pulses += 1
            self._last_end = at + length
        else:  # a hook-flash: whatever was being dialled is not a digit
            self._pulses = 0

    def digit(self, now: int) -> str | None:
        """A digit completed by the loop staying closed since the last pulse."""
        if self._pulses and now - self._last_end >= self._digit_gap:
            count, self._pulses = self._pulses, 0
            return str(count % 10) if count <= 10 else None
        return None


@dataclass(frozen=True)
class DisclosureHeard:
    """Proof that a call's disclosure played to completion and the tap heard it on the
    line: ``line_end`` is the first capture sample after the last disclosure sample left
    the line output."""

    call_id: str
    line_end: int


@dataclass
class Call:
    call_id: str
    direction: str
    offhook_sample: int
    started_at: datetime
    disclosure_name: str
    number: str | None = None
    number_source: str | None = None
    caller_name: str | None = None
    number_unknown: str | None = None
    """Why the number is not known."""
    dialled: str = ""
    dialled_by: set[str] = field(default_factory=set)
    rule: str | None = None
    polarity_at_offhook: bool = False
    last_digit_at: int = 0
    """Where the latest dialled digit was seen: tone bursts after it are ringback."""
    answered_at: int | None = None
    answered_by: str | None = None
    disclosure: PreparedDisclosure | None = None
    echo: EchoCheck | None = None
    verification: dict[str, Any] | None = None
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
    recording_seal: Future[Sealed] | None = None
    """The closed recording's sealing, queued on the sealer (``[encryption]``)."""
    lost_samples: int = 0
    capture_gaps: list[dict[str, Any]] = field(default_factory=list)
    """Audio the capture lost during the recording (overrun, device gone): where, how many
    samples became silence, and why."""
    clock_steps_from: int = 0
    """Capture position from which a step of the wall clock was not yet in ``started_at``:
    the end of the tick that dated the off-hook."""

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
        polarity: BinaryInput | None,
        led: Indicator,
        output: OutputChannel,
        clock: Clock,
        storage: Path,
        device_id: str,
        disclosures: DisclosureLibrary,
        rules: NumberRules,
        events: EventBus,
        storage_full: Callable[[], bool] = lambda: False,
        sealer: RecordingSealer | None = None,
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
        self._polarity_input = polarity
        self._led = led
        self._output = output
        self._clock = clock
        self._storage = storage
        self._device_id = device_id
        self._disclosures = disclosures
        self._rules = rules
        self._events = events
        self._storage_full = storage_full
        self._storage_state = storage_state(storage)
        """Shared with the other lines and the storage guard: a write that failed, and the
        reserve released when the storage filled up."""
        self._storage_state.watch(self.recording_open)
        self._sealer = sealer
        """Set (``[encryption]``): each recording is sealed when closed, off this thread."""
        self._led_shown: tuple[float, float] | str = "off"
        self._storage_full_shown = False
        self._capture_lost = False
        ms = self._rate // 1000
        self._hook = HookFilter(
            debounce=config.hook_debounce_ms * ms, onhook_confirm=config.onhook_confirm_ms * ms
        )
        self._output_latency = output_latency(
            capture_period=capture_period, capture_buffer=capture_buffer,
            output_buffer=output.buffer_frames, line_delay=audio.line_delay_frames)
        self._echo_lags = self._output_latency + capture_period
        self._ring_window = round(config.ring_window_s * self._rate)
        self._last_ring: int | None = None
        self._ring_confirm = RING_CONFIRM_MS * ms
        self._ring_raw = False
        self._ring_since = 0
        self._ring_began = 0
        self._ring_changes = ringer.changes
        self._hook_changes = hook.changes
        self._silence = np.zeros(0, dtype=np.int16)
        self._output_failed = False
        self._played_until = 0
        self._last_frames = capture_period
        self._blind_until = -1
        """End of the latest capture gap: what the line did before it is unknown."""
        self._dtmf = DtmfDetector(self._rate)
        self._clip = DtmfClipParser(self._rate)
        self._fsk = FskCallerIdDecoder(self._rate)
        self._progress = CallProgress(self._rate)
        self._pulses = PulseDialling(self._rate)
        self._caller_id: CallerId | None = None
        self.failures_in_a_row = 0
        self.disclosure_failures = 0
        """Since start-up, for the health topic."""
        self.in_fault = False
        self.call: Call | None = None
        self._pending: tuple[LineConfig, DisclosureLibrary, NumberRules] | None = None
        self._test_audio: np.ndarray | None = None
        self._test_written = 0

    # ---- the tick -------------------------------------------------------------------

    def tick(self, start: int, frames: int) -> None:
        """Advance the line over capture samples [start, start + frames)."""
        end = start + frames
        if self._pending is not None and self.call is None:
            self._take_pending()
        if self._storage_full() is not self._storage_full_shown:
            self._storage_full_shown = not self._storage_full_shown
            self._show_led()
        # Edge counts first: an edge between the two reads then only delays a confirmation.
        ring_changes, hook_changes = self._ring_input.changes, self._hook_input.changes
        ring_active = self._ring_input.is_active
        if ring_active != self._ring_raw or ring_changes != self._ring_changes:
            self._ring_raw, self._ring_since = ring_active, start
        self._ring_changes = ring_changes
        if ring_active and end - self._ring_since >= self._ring_confirm:
            self._last_ring = end
            self._ring_began = self._ring_since
        hook = self._hook.update(start, frames, self._hook_input.is_active,
                                 changed=hook_changes != self._hook_changes)
        self._hook_changes = hook_changes
        onhook = hook is not None and hook.edge is HookEdge.ONHOOK
        heard = self._heard(start, frames)
        state = self.state

        if state in (LineState.IDLE, LineState.RINGING):
            if hook is not None and hook.edge is HookEdge.OFFHOOK:
                self._offhook(hook.at, start)
            else:
                self._listen_for_caller_id(heard, start, end)
        elif state is LineState.CLEARED:
            if onhook:
                self.state = LineState.IDLE
        else:
            if heard is not None:
                self._progress.feed(heard, start)
            if onhook:
                assert hook is not None
                if state is LineState.ANSWERING:
                    self._begin_call()
                if state in (LineState.ANSWERING, LineState.DIALLING, LineState.DISCLOSING):
                    self._fail_disclosure(
                        "the hook input chattered without settling (whether the caller hung "
                        "up cannot be told)" if hook.unsettled
                        else "on-hook before the far end answered" if state is LineState.DIALLING
                        else "on-hook before the disclosure finished", hook.at,
                        line_fault=False)
                self._end_call(hook.at, "hook_unsettled" if hook.unsettled else "onhook")
            elif self._far_end_gone(end):
                pass
            elif state is LineState.ANSWERING:
                self._answering(start, end)
            elif state is LineState.DIALLING:
                self._dialling(hook, heard, start, end)
            elif state is LineState.DISCLOSING:
                self._disclosing(heard, start, end)
            elif state is LineState.RECORDING and hook is not None \
                    and hook.edge is HookEdge.BREAK:
                # A hook-flash: call waiting or a transfer may bring another party onto the
                # line who has not heard the notice. The call goes on, unrecorded.
                self._stop_recording(hook.at, "hook_flash")
                self.state = LineState.UNRECORDED

        self._play(start, frames)
        if self.state is LineState.RECORDING:
            self._record_until(end)
            if self._storage_state.released and self.state is LineState.RECORDING:
                self._close_on_full_storage()

    def _heard(self, start: int, frames: int) -> np.ndarray | None:
        """What the tap captured this tick, for the detectors (None if the engine fell so
        far behind that the ring no longer holds it)."""
        try:
            return self._ring_buffer.read(start, frames)
        except RingOverrun:
            return None

    def _listen_for_caller_id(self, heard: np.ndarray | None, start: int, end: int) -> None:
        """Before and between the first rings the exchange may send the caller's number:
        DTMF (A<number>C in the Netherlands) or FSK (ETSI EN 300 659)."""
        ringing = self._last_ring is not None and end - self._last_ring < self._ring_window
        if self.state is LineState.RINGING and not ringing:
            self._caller_id = None  # a missed call: its number belongs to no answered call
            self._emit(EventKind.RINGING_STOPPED, end)
        elif self.state is LineState.IDLE and ringing:
            self._emit(EventKind.RINGING, self._ring_began)  # where it began, not confirmed
        self.state = LineState.RINGING if ringing else LineState.IDLE
        known = self._caller_id
        if known is not None and not ringing \
                and end - known.position > CALLER_ID_KEEP_S * self._rate:
            self._caller_id = None
        if heard is None:
            return
        found = [clip for digit in self._dtmf.feed(heard, start)
                 if (clip := self._clip.feed(digit)) is not None]
        found += self._fsk.feed(heard, start)
        for caller_id in found:
            self._caller_id = caller_id
            number = caller_id.number
            suppressed = self._rules.rule_for(number) == NEVER_RECORD
            self._events.emit(make_event(
                EventKind.CALLER_ID, line=self.name, call_id=None,
                ts=self._clock.timestamp(self._capture_name, caller_id.position),
                sample=caller_id.position, source=f"clip_{caller_id.source}",
                number=None if suppressed else number,
                name=None if suppressed else caller_id.name,
                absence=caller_id.absence, rule=NEVER_RECORD if suppressed else None))

    def _far_end_gone(self, end: int) -> bool:
        """The busy (disconnect) tone: before the notice finished, the far end is not or no
        longer there to hear it; held for busy_tone_end_s, it ends the call."""
        busy = self._progress.busy_since()
        if busy is None:
            return False
        if self.state is LineState.ANSWERING:
            self._begin_call()
        if self.state in (LineState.ANSWERING, LineState.DIALLING, LineState.DISCLOSING):
            self._fail_disclosure("busy tone: the far end is not, or no longer, on the line",
                                  max(busy, self.call.offhook_sample if self.call else busy),
                                  line_fault=False)
        if end - busy >= self.config.busy_tone_end_s * self._rate:
            self._end_call(busy, "busy_tone")
            self.state = LineState.CLEARED
        return True

    def _dialling(self, hook: HookEvent | None, heard: np.ndarray | None, start: int,
                  end: int) -> None:
        call = self.call
        assert call is not None
        if hook is not None and hook.edge is HookEdge.BREAK:
            self._pulses.loop_break(hook.at, hook.length)
        digits = []
        if (digit := self._pulses.digit(end)) is not None:
            digits.append((digit, "pulse"))
        if heard is not None:
            digits += [(tone.symbol, "dtmf") for tone in self._dtmf.feed(heard, start)]
        for symbol, how in digits:
            call.last_digit_at = end
            call.dialled += symbol
            call.dialled_by.add(how)
            call.number = call.dialled
            call.number_source = ("dialled_" + how if call.dialled_by == {how}
                                  else "dialled")
        answered_by = None
        if self._polarity_input is not None:
            # The HAT sees the exchange reverse the line when the far end answers: a change
            # from the level at off-hook, so that a line wired the other way round does not
            # pass for answered from the start.
            if self._polarity_input.is_active != call.polarity_at_offhook:
                answered_by = "polarity_reversal"
        elif not self._progress.tone_active and (
                self._progress.ringback_bursts or self._progress.bursts_since(
                    call.last_digit_at, round(RINGBACK_MIN_S * self._rate),
                    round(RINGBACK_MAX_S * self._rate))):
            speech = self._progress.speech_since()
            last_tone = self._progress.last_tone_end or 0
            if speech is not None and speech >= last_tone:
                answered_by = "ringback_then_speech"
        if answered_by is not None:
            self._answered(answered_by, start)
        elif end - call.offhook_sample >= self.config.answer_timeout_s * self._rate:
            self._fail_disclosure(
                f"outbound call: no answer detected within answer_timeout_s = "
                f"{self.config.answer_timeout_s:g}; a notice played now might not reach the "
                "far end, so the call is not recorded", end, line_fault=False)

    def _disclosing(self, heard: np.ndarray | None, start: int, end: int) -> None:
        call = self.call
        assert call is not None
        if call.echo is not None and heard is not None:
            call.echo.feed(heard, start)
        if self._hook.loop_open:
            # Any loop break, hung up or not, may have cut the notice short for the far end.
            self._fail_disclosure("the loop opened (on-hook or hook-flash) during the "
                                  "disclosure", end, line_fault=False)
        elif self._output.underruns != call.underruns_at_start:
            # The output ran dry after the notice began: the far end heard a gap in it.
            self._fail_disclosure("the line output ran dry (underrun) during the disclosure",
                                  end)
        elif self._disclosure_line_end(call) is not None \
                and call.heard_by(end - self._hook.debounce) and self._far_end_stayed(call, end):
            # Waiting one debounce past the end lets a loop break that began just before
            # it show itself as loop_open first.
            heard_proof = self._complete_disclosure()
            if heard_proof is not None:
                self._arm_recording(heard_proof)

    def _far_end_stayed(self, call: Call, end: int) -> bool:
        """Did the far end stay on the line through the disclosure? A busy tone that began
        during it is hidden under the notice's own echo, so the line listens on after the
        end: quiet (no tone) for QUIET_AFTER_S, or a tone that is no busy cadence within
        BUSY_DECIDE_S (a busy one fails the disclosure in _far_end_gone meanwhile). The
        recording still starts at the disclosure's end; the ring holds the audio."""
        assert call.disclosure_line_end is not None
        after = end - call.disclosure_line_end
        progress = self._progress
        tone_after = progress.tone_active or (progress.last_tone_end or -1) > \
            call.disclosure_line_end
        if not tone_after:
            return after >= QUIET_AFTER_S * self._rate
        if after >= BUSY_DECIDE_S * self._rate:
            # A call progress tone that is no busy cadence (dial tone, ringback): the line
            # is not in a call with a far end that heard the notice.
            self._fail_disclosure("a call progress tone (dial tone or ringback) followed the "
                                  "disclosure: no far end was on the line to hear it", end,
                                  line_fault=False)
        return False

    def note_capture_gap(self, position: int, lost: int, cause: str) -> None:
        """The capture lost ``lost`` samples at ``position`` (now silence). While it was
        gone nobody watched the hook: if the gap could hide a hang-up (and a new call
        answered since), the disclosure fails and the recording ends where the gap began;
        the call goes on unrecorded until on-hook."""
        self._blind_until = max(self._blind_until, position + lost)
        call = self.call
        if call is None:
            return
        if call.recording is not None or (call.heard_by(position)
                                          and self.state is LineState.DISCLOSING):
            # In the recording, or in what it will hold from the disclosure's end.
            call.capture_gaps.append({"sample": position, "lost_samples": lost,
                                      "cause": cause})
        blind = cause == "device" or lost >= self._hook.onhook_confirm
        if not blind:
            return
        if self.state is LineState.ANSWERING:
            self._begin_call()
        if self.state in (LineState.ANSWERING, LineState.DIALLING, LineState.DISCLOSING):
            self._fail_disclosure("the capture was lost before the disclosure finished, so "
                                  "the line was not watched", position, line_fault=False)
        elif self.state is LineState.RECORDING:
            self._stop_recording(position, "capture_lost")
            self.state = LineState.UNRECORDED
            self._emit(EventKind.ERROR, position,
                       message=f"the capture was lost for {lost / self._rate:.1f} s; the "
                       "recording ends where it was lost, the call goes on unrecorded")

    def test_disclosure(self, direction: str) -> PreparedDisclosure:
        """Play this line's disclosure for ``direction`` into the line, as a test (from the
        commands thread). Only into a line that is off-hook with no call in it: just lifted
        with nothing dialled yet, or left off-hook after the far end hung up. Raises
        ValueError saying why not."""
        if not self._testable():
            raise ValueError(
                f"line {self.name} is on-hook: nobody would hear it; lift the handset on this "
                "line and dial nothing, then ask again (or ask for render)"
                if self.state in (LineState.IDLE, LineState.RINGING) else
                f"line {self.name} has a call in progress ({self.state}); try when it is free")
        prepared = self._disclosures.prepare(self.config.disclosure_for[direction])
        self._test_written = 0
        self._test_audio = prepared.audio
        return prepared

    def _testable(self) -> bool:
        call = self.call
        return self.state is LineState.CLEARED or (
            self.state is LineState.DIALLING and call is not None and not call.dialled
            and not self._progress.ringback_bursts)

    def reconfigure(self, config: LineConfig, disclosures: DisclosureLibrary,
                    rules: NumberRules) -> None:
        """New call settings (from another thread): taken on at the first tick without a
        call, so a call in progress keeps the settings it started with."""
        self._pending = (config, disclosures, rules)

    def _take_pending(self) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        config, self._disclosures, self._rules = pending
        self.config = config
        ms = self._rate // 1000
        self._hook.debounce = config.hook_debounce_ms * ms
        self._hook.onhook_confirm = config.onhook_confirm_ms * ms
        self._ring_window = round(config.ring_window_s * self._rate)

    def shutdown(self, position: int) -> None:
        """The service stops: close an open recording with what was captured."""
        self._close_call(position, "shutdown")

    def fault(self, position: int, exc: BaseException) -> None:
        """An unexpected error in this line: end the call safely and start over idle."""
        self._emit(EventKind.ERROR, position, message=f"internal error on line {self.name}: {exc}")
        if self._played_until <= position:
            # The failed tick never queued its period: the line output would run a period
            # short from here on, for every line of its playback device.
            with contextlib.suppress(Exception):
                self._play(position, self._last_frames)
        try:
            self._close_call(position, "error")
        except Exception:
            logger.exception("line %s: the call could not be ended cleanly", self.name,
                             extra=self.journal_fields())
            if self.call is not None and self.call.recording is not None:
                self.call.recording.abandon()  # the .part stays for inspection
            self.call = None
            self.state = LineState.IDLE
            self._show_led()

    def _close_call(self, position: int, reason: str) -> None:
        if self.state is LineState.ANSWERING:
            self._begin_call()
        if self.state in (LineState.ANSWERING, LineState.DIALLING, LineState.DISCLOSING):
            self._fail_disclosure(f"the call was closed before the disclosure finished "
                                  f"({reason})", position, line_fault=False)
        if self.call is not None:
            self._end_call(position, reason)
        self.state = LineState.IDLE

    # ---- call steps -----------------------------------------------------------------

    def _offhook(self, offhook_at: int, now: int) -> None:
        inbound = self._last_ring is not None and offhook_at - self._last_ring < self._ring_window
        started = self._clock.timestamp(self._capture_name, offhook_at)
        call = Call(
            call_id=new_call_id(self.name, started),
            direction="inbound" if inbound else "outbound",
            offhook_sample=offhook_at,
            started_at=started,
            disclosure_name=self.config.disclosure_for["inbound" if inbound else "outbound"],
        )
        self.call = call
        caller_id, self._caller_id = self._caller_id, None
        if self._polarity_input is not None:
            call.polarity_at_offhook = self._polarity_input.is_active
        call.last_digit_at = offhook_at
        call.clock_steps_from = now + self._last_frames + 1
        self._pulses = PulseDialling(self._rate)
        self._progress.reset()
        self._dtmf.reset()
        if not inbound:
            # The far end hears nothing until it answers: the notice waits for the answer.
            self._progress.listen_for_speech = True
            self._begin_call()
            self.state = LineState.DIALLING
            return
        # Speech tells an answered call from dial tone now, and later only the answer of
        # an outbound call; tones always matter.
        self._progress.listen_for_speech = True
        if caller_id is not None:
            call.number = caller_id.number
            call.caller_name = caller_id.name
            call.number_source = f"clip_{caller_id.source}"
            call.number_unknown = None if caller_id.number else \
                (caller_id.absence or "not sent")
        else:
            call.number_unknown = "no caller id received"
        self.state = LineState.ANSWERING

    def _answering(self, start: int, end: int) -> None:
        """Ringing, then off-hook: an answered call, unless the line gives dial tone (the
        caller had given up just before; the office is making a call of its own)."""
        call = self.call
        assert call is not None
        progress = self._progress
        tone_since = progress.tone_since
        if tone_since is not None and end - tone_since >= DIAL_TONE_MIN_S * self._rate:
            call.direction = "outbound"
            call.disclosure_name = self.config.disclosure_for["outbound"]
            call.number = call.caller_name = call.number_source = call.number_unknown = None
            self._begin_call()
            self.state = LineState.DIALLING
            return
        if self._blind_until >= call.offhook_sample - self._last_frames:
            # The capture was lost around the answer: nobody heard whether it is a call
            # coming in or the office's own call after a missed one.
            self._begin_call()
            self._fail_disclosure("the capture was lost around the answer, so whether the "
                                  "line gave dial tone is not known", end, line_fault=False)
            return
        heard_long_enough = end - call.offhook_sample - self._hook.debounce \
            >= DIAL_TONE_CHECK_S * self._rate
        if self._hook.loop_open or progress.tone_active:
            return  # a flash right away, or a tone that may yet be dial tone: listen on
        if heard_long_enough or progress.speech_since() is not None:
            # The caller speaking is an answered call too: no need to wait longer.
            self._progress.listen_for_speech = False
            self._begin_call()
            self._start_disclosure(start)

    def _begin_call(self) -> None:
        call = self.call
        assert call is not None
        # The receipt before the event: a power cut between the two must not leave a call
        # that the office was told of and that has no receipt.
        self._save_receipt(call, call.offhook_sample)
        self._emit(EventKind.CALL_STARTED, call.offhook_sample, direction=call.direction)

    def _answered(self, how: str, now: int) -> None:
        call = self.call
        assert call is not None
        call.answered_at = now
        call.answered_by = how
        self._progress.listen_for_speech = False
        if not call.dialled:
            call.number_unknown = "no digits were seen (dialled before off-hook, or by a "\
                "phone that sends them some other way)"
        self._emit(EventKind.CALL_ANSWERED, now, answered_by=how)
        self._start_disclosure(now)

    def _start_disclosure(self, now: int) -> None:
        call = self.call
        assert call is not None
        call.rule = self._rules.rule_for(call.number)
        if call.rule is None and self._storage_refused():
            # No room to record: turned away at the start rather than cut off mid-call.
            call.rule = STORAGE_FULL
        if call.rule is not None:
            if call.rule == NEVER_RECORD:
                # Data minimisation: the receipt and events do not keep this number.
                call.number = call.caller_name = None
                call.number_unknown = "withheld by the never_record rule"
            self.state = LineState.UNRECORDED
            self._save_receipt(call, now)
            return
        try:
            call.disclosure = self._disclosures.prepare(call.disclosure_name)
        except (AudioFileError, ValueError) as exc:
            # Whatever is wrong with the file, nothing is recorded.
            self._fail_disclosure(f"disclosure cannot be played: {exc}", now)
            return
        call.disclosure_first_sample = now
        call.echo = EchoCheck(call.disclosure.audio, now, self._echo_lags)
        call.underruns_at_start = self._output.underruns
        call.disclosure_started_at = self._clock.timestamp(self._capture_name, now)
        self.state = LineState.DISCLOSING
        self._emit(EventKind.DISCLOSURE_STARTED, now, disclosure=call.disclosure.name,
                   languages=call.disclosure.languages,
                   duration_s=round(len(call.disclosure.audio) / self._rate, 3))

    def _complete_disclosure(self) -> DisclosureHeard | None:
        """The disclosure has left the line: it counts only if the tap heard it there."""
        call = self.call
        assert call is not None and call.disclosure_line_end is not None
        assert call.echo is not None
        score, lag = call.echo.score()
        threshold = self.config.verify_min_score
        call.verification = {"score": round(score, 3), "threshold": threshold,
                             "lag_samples": lag}
        if score < threshold:
            # Next to nothing of it on the line is the output's fault; some of it, drowned
            # by the far end talking over it or by noise, is not (and fails all the same).
            silent = score < threshold * SILENT_OUTPUT_SHARE
            if silent:
                self._emit(EventKind.ERROR, call.disclosure_line_end,
                           message=f"line {self.name}: the disclosure played but the line did "
                           "not carry it; check the HAT's line output for this line")
            cause = ("the line output may be silent or disconnected" if silent else
                     "the far end talked over it, or the line is noisy")
            self._fail_disclosure(
                f"the disclosure was not heard on the line (correlation {score:.2f}, needs "
                f"{threshold:g}): {cause}", call.disclosure_line_end, line_fault=silent)
            return None
        call.disclosure_completed_at = self._clock.timestamp(self._capture_name,
                                                             call.disclosure_line_end)
        self._emit(EventKind.DISCLOSURE_COMPLETED, call.disclosure_line_end,
                   score=call.verification["score"])
        self.failures_in_a_row = 0
        if self.in_fault:
            self.in_fault = False
            self._show_led()
            self._emit(EventKind.LINE_RECOVERED, call.disclosure_line_end)
        return DisclosureHeard(call.call_id, call.disclosure_line_end)

    def _fail_disclosure(self, reason: str, position: int, *, line_fault: bool = True) -> None:
        """No recording on this call. ``line_fault``: the line, not the caller, is why (the
        file, the output, the notice not heard); three in a row put the line in fault."""
        call = self.call
        assert call is not None
        call.disclosure_failure = reason
        self.disclosure_failures += 1
        self.state = LineState.UNRECORDED
        self._emit(EventKind.DISCLOSURE_FAILED, position, reason=reason)
        self._save_receipt(call, position)
        if not line_fault:
            return
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= FAULT_AFTER_FAILURES and not self.in_fault:
            self.in_fault = True
            self._show_led()
            self._emit(EventKind.LINE_FAULT, position,
                       message=f"the disclosure failed on {self.failures_in_a_row} calls in a "
                       f"row (last: {reason}); calls on line {self.name} are not recorded "
                       "until a disclosure is heard again")

    def _arm_recording(self, heard: DisclosureHeard) -> None:
        """THE compliance rule: recording starts only from proof that this call's disclosure
        was heard, at the first sample after it left the line; nothing earlier is written."""
        call = self.call
        assert call is not None and heard.call_id == call.call_id
        path = recording_path(self._storage, call.call_id, call.started_at)
        final = sealed_path(path) if self._sealer else path
        refused = self._storage_refused()
        if not refused:
            # The receipt says the disclosure was heard and where the recording starts
            # before the file exists: a power cut between the two must never leave audio
            # beside a receipt that shows no disclosure (the start-up recovery then finds the
            # recording `missing` instead, and says so). With encryption the receipt names
            # the sealed file from the start: the plaintext is only ever a stage on the way.
            call.recording_summary = {"file": final.name, "status": "recording",
                                      "first_sample": heard.line_end}
            if self._sealer:
                call.recording_summary["encrypted"] = self._sealer.description
            self._save_receipt(call, heard.line_end)
            # A receipt that could not be written (or that filled the storage) marks the
            # storage as failed: then no audio without it.
            refused = self._storage_state.refusing
        if refused:
            # The storage filled up (or failed) while the disclosure played: fail closed.
            call.recording_summary = None
            call.rule = STORAGE_FULL
            self.state = LineState.UNRECORDED
            self._emit(EventKind.ERROR, heard.line_end,
                       message=f"the storage {self._storage} is full or failed during the "
                       "disclosure: this call is not recorded")
            self._save_receipt(call, heard.line_end)
            return
        try:
            call.recording = RecordingFile(
                path,
                rate=self._rate,
                bitrate=self._audio.bitrate,
                complexity=self._audio.complexity,
                page_interval_s=self._audio.page_interval_s,
                fsync_interval_s=self._audio.fsync_interval_s,
                vendor=f"linerec {__version__}",
                tags=self._recording_tags(call),
                # A held busy tone ends the recording where the tone began.
                max_rewind_s=self.config.busy_tone_end_s + 2.0,
            )
        except Exception as exc:
            if isinstance(exc, OSError):
                self._storage_state.write_failed(exc)
            call.recording_summary = None
            self.state = LineState.UNRECORDED
            self._emit(EventKind.ERROR, heard.line_end,
                       message=f"cannot create the recording {path}: {exc}")
            return
        call.recording_first_sample = heard.line_end
        call.recording_next_sample = heard.line_end
        self.state = LineState.RECORDING
        self._show_led()
        self._emit(EventKind.RECORDING_STARTED, heard.line_end, file=str(final))

    def recording_open(self) -> bool:
        """Read by the storage guard's thread: a snapshot is all it needs."""
        call = self.call
        return call is not None and call.recording is not None

    def _storage_refused(self) -> bool:
        """No recording may start: under the floor, a write failed, or the storage is not
        where (or what) the guard last found it."""
        return self._storage_full() or self._storage_state.refusing \
            or self._storage_state.moved()

    def _recording_tags(self, call: Call) -> dict[str, str]:
        tags = {
            "call_id": call.call_id,
            "line": self.name,
            "direction": call.direction,
            "start_time": iso_ms(call.started_at),
            "device_id": self._device_id,
        }
        if call.number:
            tags["caller" if call.direction == "inbound" else "dialled"] = call.number
        return tags

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
            if self._storage_state.write_failed(exc):
                # The storage is full. What was encoded stays buffered; the tick closes the
                # recording with it, in the room the released reserve made.
                call.recording_next_sample = limit
                return
            recording = call.recording
            self._emit(EventKind.ERROR, limit,
                       message=f"writing the recording failed: {exc}; what was written is in "
                       f"{recording.part_path}")
            recording.abandon()
            call.recording_summary = {"file": recording.part_path.name, "status": "incomplete",
                                      "first_sample": call.recording_first_sample,
                                      "error": str(exc), "lost_samples": call.lost_samples,
                                      "capture_gaps": call.capture_gaps}
            call.recording = None
            self._show_led()
            self.state = LineState.UNRECORDED
            return
        call.recording_next_sample = limit

    def _stop_recording(self, stop: int, reason: str = "call_ended") -> None:
        """Close the recording at capture sample ``stop``; ``reason``: call_ended,
        hook_flash or capture_lost."""
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
            # recording, written meanwhile, is cut back to the sample where it opened. (It
            # holds less after a write that failed before encoding: a failed sync.)
            size = recording.close(end=min(stop - first, recording.samples))
        except Exception as exc:
            if isinstance(exc, OSError):
                self._storage_state.write_failed(exc)
            recording.abandon()
            self._show_led()
            call.recording_summary = {
                "file": recording.part_path.name,
                "status": "incomplete",
                "first_sample": first,
                "error": str(exc),
                "lost_samples": call.lost_samples,
                "capture_gaps": call.capture_gaps,
            }
            self._emit(EventKind.ERROR, stop,
                       message=f"closing the recording {recording.path} failed: {exc}; "
                       f"what was written is in {recording.part_path}")
            return
        self._show_led()
        duration = round(recording.samples / self._rate, 3)
        final = recording.path
        encrypted = None
        if self._sealer:
            # Sealed on the sealer's thread; the call's final receipt is queued after it
            # there and takes the sealed file's hash and size (``_seal_receipt_later``).
            call.recording_seal = self._sealer.seal(recording.path)
            final = sealed_path(recording.path)
            encrypted = self._sealer.description
        call.recording_summary = {
            "file": final.name,
            "status": "complete",
            "sha256": None if encrypted else file_sha256(recording.path),
            "first_sample": first,
            "end_sample": first + recording.samples,
            "duration_s": duration,
            "bytes": size,
            "codec": "opus",
            "sample_rate": self._rate,
            "bitrate": self._audio.bitrate,
            "lost_samples": call.lost_samples,
            "capture_gaps": call.capture_gaps,
            "stop_reason": reason,
        }
        if encrypted:
            call.recording_summary["encrypted"] = encrypted
        self._emit(EventKind.RECORDING_STOPPED, first + recording.samples,
                   file=str(final), duration_s=duration, bytes=size, reason=reason)

    def _close_on_full_storage(self) -> None:
        """The storage is full (a write of this line's or of another's failed): close the
        recording now with all it holds, in the room the released reserve made, before
        anything else fills it; the call goes on unrecorded."""
        call = self.call
        assert call is not None and call.recording is not None
        first = call.recording_first_sample
        assert first is not None
        recording = call.recording
        end = first + recording.samples
        self._stop_recording(end, "storage_full")
        self.state = LineState.UNRECORDED
        kept = (call.recording_summary or {}).get("duration_s")
        closed = (f"ends here with the {kept} s it holds" if kept is not None
                  else f"could not be closed even so (what was written is in "
                  f"{recording.part_path.name})")
        self._emit(EventKind.ERROR, end,
                   message=f"the storage {self._storage} is full: the recording "
                   f"{recording.path.name} {closed}, and the call goes on unrecorded; new "
                   "calls are not recorded until space is freed (export and delete calls, "
                   "or fit a larger card)")

    def _end_call(self, at: int, reason: str) -> None:
        call = self.call
        assert call is not None
        if call.recording is not None:
            self._stop_recording(at)
        ended = self._clock.timestamp(self._capture_name, at)
        duration = round((at - call.offhook_sample) / self._rate, 3)
        recorded = (call.recording_summary or {}).get("status") == "complete"
        self._emit(EventKind.CALL_ENDED, at, reason=reason, duration_s=duration,
                   recorded=recorded, rule=call.rule)
        steps = self._clock.steps(self._capture_name, call.clock_steps_from)
        if steps:  # even steps that cancel out: the receipt lists them, the log says so
            logger.warning("the wall clock was set %d time(s), by %+.3f s in all, during call "
                           "%s: its ended_at and started_at differ by that besides the %.3f s "
                           "it lasted (its receipt lists the steps)", len(steps),
                           sum(step.seconds for step in steps), call.call_id, duration,
                           extra=self.journal_fields())
        self._save_receipt(call, at, ended=ended, reason=reason)
        self.call = None
        self.state = LineState.IDLE
        self._show_led()

    # ---- outputs --------------------------------------------------------------------

    def show_capture_lost(self, lost: bool) -> None:
        """The capture device is gone (or back): the line cannot hear, so its LED says it is
        in error meanwhile. Called by the engine, which ticks no line while it waits."""
        self._capture_lost = lost
        self._show_led()

    def _show_led(self) -> None:
        """The LED says what the line does: the fault blink while its capture device is
        lost (even with a recording open: nothing reaches it), steady while a recording is
        open, the fault blink while the line is in fault, the storage blink while calls are
        turned away for want of space, else off."""
        wanted: tuple[float, float] | str
        if self._capture_lost:
            wanted = FAULT_BLINK_S  # a recording open meanwhile is not being fed
        elif self.call is not None and self.call.recording is not None:
            wanted = "on"
        elif self.in_fault:
            wanted = FAULT_BLINK_S
        elif self._storage_full_shown:
            wanted = STORAGE_FULL_BLINK_S
        else:
            wanted = "off"
        if wanted == self._led_shown:
            return  # a blink restarted every period would never blink
        self._led_shown = wanted
        if wanted == "on":
            self._led.on()
        elif wanted == "off":
            self._led.off()
        else:
            assert isinstance(wanted, tuple)
            self._led.blink(*wanted)

    def _play(self, start: int, frames: int) -> None:
        """Queue one period for the line output: the disclosure while disclosing, else
        silence, so the output runs in step with the capture clock."""
        call = self.call
        end = start + frames
        self._played_until = end
        self._last_frames = frames
        ticket = None
        disclosing = (self.state is LineState.DISCLOSING and call is not None
                      and call.disclosure is not None
                      and call.disclosure_written < len(call.disclosure.audio))
        if disclosing:
            assert call is not None and call.disclosure is not None
            written = call.disclosure_written
            chunk = call.disclosure.audio[written : written + frames]
            if len(chunk) < frames:
                chunk = np.concatenate([chunk, np.zeros(frames - len(chunk), np.int16)])
            if call.disclosure_written + frames >= len(call.disclosure.audio):
                # The last of the notice: the playback thread notes the capture position
                # when it hands this period to the device.
                ticket = WriteTicket()
                call.disclosure_ticket = ticket
                call.disclosure_last_chunk_end = end
        elif self._test_audio is not None and self._testable():
            # An installer's test of the disclosure, into a line with no call: not a notice
            # that lets anything be recorded.
            chunk = self._test_audio[self._test_written : self._test_written + frames]
            self._test_written += frames
            if self._test_written >= len(self._test_audio):
                self._test_audio = None
            if len(chunk) < frames:
                chunk = np.concatenate([chunk, np.zeros(frames - len(chunk), np.int16)])
        else:
            self._test_audio = None
            if len(self._silence) != frames:
                self._silence = np.zeros(frames, np.int16)
            chunk = self._silence
        try:
            self._output.write(chunk, ticket=ticket, silent=chunk is self._silence)
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
            call.disclosure_written = min(len(call.disclosure.audio),
                                          call.disclosure_written + frames)

    def _disclosure_line_end(self, call: Call) -> int | None:
        """Where the notice has surely left the line, once the playback thread has handed
        its last period to the device: dated by the capture clock at that moment, not by
        the tick (when the engine runs behind the capture, the tick is early)."""
        ticket = call.disclosure_ticket
        if call.disclosure_line_end is None and ticket is not None \
                and ticket.captured_before_write is not None:
            assert call.disclosure is not None and call.disclosure_first_sample is not None
            chunk_end = call.disclosure_last_chunk_end
            padding = chunk_end - call.disclosure_first_sample - len(call.disclosure.audio)
            given_at = max(ticket.captured_before_write, chunk_end)
            call.disclosure_line_end = given_at - padding + self._output_latency
        return call.disclosure_line_end

    def journal_fields(self) -> dict[str, str]:
        """LINE and the current CALL_ID for this line's own log records."""
        return journal_fields(line=self.name, call_id=self.call.call_id if self.call else None)

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
        leaves one behind for the start-up recovery), and sealed into the appliance's hash
        chain when it ends."""
        path = receipt_path(self._storage, call.call_id, call.started_at)
        if call.disclosure_completed_at:
            disclosure_status = "completed"
        elif call.disclosure_failure:
            disclosure_status = "failed"
        elif call.disclosure_started_at:
            disclosure_status = "playing"
        else:
            disclosure_status = "not_played"
        purpose = self._disclosures.purpose_of(call.disclosure_name)
        disclosure = (call.disclosure.receipt() if call.disclosure is not None
                      else self._disclosures.describe(call.disclosure_name))
        started = call.started_at
        # Data minimisation: a number under a never_record rule is never written, whether
        # or not the call got as far as the rule being applied.
        rule = call.rule or (NEVER_RECORD if self._rules.rule_for(call.number) == NEVER_RECORD
                             else None)
        if rule == NEVER_RECORD:
            number: dict[str, Any] = {"value": None, "source": None, "name": None,
                                      "unknown_reason": "withheld by the never_record rule"}
        else:
            number = {"value": call.number, "source": call.number_source,
                      "name": call.caller_name,
                      "unknown_reason": None if call.number else call.number_unknown}
        receipt = {
            "schema": RECEIPT_SCHEMA,
            "call_id": call.call_id,
            "state": "closed" if ended else "open",
            "line": self.name,
            "device_id": self._device_id,
            "direction": call.direction,
            "number": number,
            "rule": rule,
            "started_at": iso_ms(started),
            "ended_at": iso_ms(ended) if ended else None,
            "end_reason": reason,
            "clock_synchronised": self._clock.synchronised(),
            "clock_steps": [{"sample": step.sample, "at": iso_ms(step.at),
                             "seconds": step.seconds}
                            for step in self._clock.steps(self._capture_name,
                                                          call.clock_steps_from)],
            "sample_rate": self._rate,
            "offhook_sample": call.offhook_sample,
            "answered": {"sample": call.answered_at, "by": call.answered_by}
            if call.answered_at is not None else None,
            "purpose": {"name": purpose.name, "text": purpose.text,
                        "lawful_basis": purpose.lawful_basis,
                        "retention_days": purpose.retention_days},
            "retention_until": (started + timedelta(days=purpose.retention_days))
            .date().isoformat(),
            "disclosure": {
                **disclosure,
                "first_sample": call.disclosure_first_sample,
                "line_end_sample": call.disclosure_line_end
                if call.disclosure_completed_at else None,
                "started_at": iso_ms(call.disclosure_started_at)
                if call.disclosure_started_at else None,
                "completed_at": iso_ms(call.disclosure_completed_at)
                if call.disclosure_completed_at else None,
                "status": disclosure_status,
                "played_s": round(call.disclosure_written / self._rate, 3)
                if call.disclosure_started_at else None,
                "failure": call.disclosure_failure,
                "verification": call.verification,
            },
            "recording": dict(call.recording_summary) if call.recording_summary else None,
            "linerec_version": __version__,
        }
        if ended and call.recording_seal is not None and self._sealer is not None:
            seal = call.recording_seal
            self._sealer.then(lambda: self._seal_receipt_later(path, receipt, seal))
            return
        if not ended and self._storage_state.unusable is not None:
            return  # storage gone or read-only: one error for the call, at its final receipt
        try:
            self._write_receipt(path, receipt)
        except OSError as exc:
            self._emit(EventKind.ERROR, at, message=f"cannot write the receipt {path}: {exc}")

    def _write_receipt(self, path: Path, receipt: dict[str, Any]) -> None:
        """Write (or seal, once final) a receipt; when the storage turns out full, once more
        in the room of the reserve that this releases."""
        unusable = self._storage_state.unusable
        if unusable is not None:
            raise OSError(errno.ENODEV, f"not written, as {unusable}")
        def write() -> None:
            if receipt["state"] == "open":
                write_receipt(path, receipt)
            else:
                seal_receipt(self._storage, path, receipt)

        try:
            write()
        except OSError as exc:
            if not self._storage_state.write_failed(exc):
                raise
            write()

    def _seal_receipt_later(self, path: Path, receipt: dict[str, Any],
                            seal: Future[Sealed]) -> None:
        """On the sealer's thread, after the recording's sealing: the final receipt takes the
        sealed file's hash and size and joins the chain. Touches nothing of the line's: the
        line is on its next call by now."""
        recording = dict(receipt["recording"])
        call_id = receipt["call_id"]
        try:
            sealed = seal.result()
        except Exception as exc:
            # The plaintext stays, named by the receipt, so the recording is not lost.
            plain = path.with_name(recording["file"].removesuffix(SEALED_SUFFIX))
            recording.pop("encrypted", None)
            recording.update(file=plain.name, error=f"sealing failed: {exc}")
            try:
                recording["sha256"] = file_sha256(plain)
                recording["bytes"] = plain.stat().st_size
            except OSError:
                recording.update(status="missing", sha256=None)
            self._emit_unsited(EventKind.ERROR, call_id,
                               message=f"sealing the recording {plain} failed: {exc}; it "
                               "stays unencrypted")
        else:
            recording.update(sha256=sealed.sha256, bytes=sealed.bytes)
        receipt["recording"] = recording
        try:
            self._write_receipt(path, receipt)
        except OSError as exc:
            self._emit_unsited(EventKind.ERROR, call_id,
                               message=f"cannot write the receipt {path}: {exc}")

    def _emit_unsited(self, kind: EventKind, call_id: str, **fields: Any) -> None:
        """An event from off the engine thread: dated by the wall clock, no sample."""
        self._events.emit(make_event(kind, line=self.name, call_id=call_id,
                                     ts=datetime.now(UTC), **fields))
