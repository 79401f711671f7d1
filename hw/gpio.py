"""GPIO adapter: the only module that imports gpiozero."""

from __future__ import annotations

from typing import Any

from gpiozero import LED, Device, DigitalInputDevice
from gpiozero.pins.mock import MockFactory

from linerec.hw.base import HardwareError

PIN_ERRORS: tuple[type[Exception], ...] = (Exception,)
"""What claiming a pin may raise: gpiozero's own errors, and from below it whatever the
pin library raises (lgpio's own error class for "GPIO busy", OSError for no rights on
/dev/gpiochip*). Each becomes a HardwareError naming the pin."""


class GpioInput:
    """A digital input read by level; debouncing happens on the audio clock in the line's
    hook filter. Edge callbacks only count the edges (gpiozero's bounce_time, which drops
    edges, is not used): a level that flipped and flipped back between two reads is
    chatter, not a level held."""

    def __init__(self, pin: int, *, active_high: bool, name: str, pin_factory: Any = None):
        self._changes = 0
        try:
            self._device = DigitalInputDevice(
                pin, pull_up=None, active_state=active_high, pin_factory=pin_factory
            )
            # Called on gpiozero's edge thread (on the simulated HAT, the engine's): only
            # that thread writes the count.
            self._device.when_activated = self._changed
            self._device.when_deactivated = self._changed
        except PIN_ERRORS as exc:
            raise HardwareError(f"GPIO {pin} ({name}) cannot be used: {exc}") from exc

    def _changed(self) -> None:
        self._changes += 1

    @property
    def is_active(self) -> bool:
        return bool(self._device.is_active)

    @property
    def changes(self) -> int:
        return self._changes

    def close(self) -> None:
        self._device.close()


class GpioLed:
    """An LED on a GPIO output."""

    def __init__(self, pin: int, *, name: str, pin_factory: Any = None) -> None:
        try:
            self._led = LED(pin, pin_factory=pin_factory)
        except PIN_ERRORS as exc:
            raise HardwareError(f"GPIO {pin} ({name}) cannot be used: {exc}") from exc

    @property
    def is_lit(self) -> bool:
        return bool(self._led.is_lit)

    def on(self) -> None:
        self._led.on()

    def off(self) -> None:
        self._led.off()

    def blink(self, on_s: float, off_s: float) -> None:
        # gpiozero flashes it from its own background thread; on() and off() stop that.
        self._led.blink(on_time=on_s, off_time=off_s, background=True)

    def close(self) -> None:
        self._led.close()


def pin_factory_name() -> str:
    """The pin factory gpiozero chose at the first pin (LGPIOFactory on current Pis, the
    Pi 5 included; GPIOZERO_PIN_FACTORY overrides), for the log."""
    factory = Device.pin_factory
    return type(factory).__name__ if factory is not None else "none yet"


def mock_pin_factory() -> Any:
    """gpiozero's own mock pins: the simulated HAT's GPIO."""
    return MockFactory()


def drive_input(factory: Any, pin: int, *, high: bool) -> None:
    """Set the level of a mock input pin, as the HAT's sensor would."""
    mock = factory.pin(pin)
    if high:
        mock.drive_high()
    else:
        mock.drive_low()


def pin_is_high(factory: Any, pin: int) -> bool:
    """Level of a mock pin (for an output, what the daemon drives)."""
    return bool(factory.pin(pin).state)
