"""GPIO adapter: the only module that imports gpiozero."""

from __future__ import annotations

from typing import Any

from gpiozero import LED, DigitalInputDevice, GPIOZeroError

from linerec.hw.base import HardwareError


class GpioInput:
    """A digital input read by level; debouncing happens on the audio clock in the line's
    hook filter, so edge callbacks (and gpiozero's bounce_time) are not used."""

    def __init__(self, pin: int, *, active_high: bool, name: str, pin_factory: Any = None):
        try:
            self._device = DigitalInputDevice(
                pin, pull_up=None, active_state=active_high, pin_factory=pin_factory
            )
        except GPIOZeroError as exc:
            raise HardwareError(f"GPIO {pin} ({name}) cannot be used: {exc}") from exc

    @property
    def is_active(self) -> bool:
        return bool(self._device.is_active)

    def close(self) -> None:
        self._device.close()


class GpioLed:
    """An LED on a GPIO output."""

    def __init__(self, pin: int, *, name: str, pin_factory: Any = None) -> None:
        try:
            self._led = LED(pin, pin_factory=pin_factory)
        except GPIOZeroError as exc:
            raise HardwareError(f"GPIO {pin} ({name}) cannot be used: {exc}") from exc

    @property
    def is_lit(self) -> bool:
        return bool(self._led.is_lit)

    def on(self) -> None:
        self._led.on()

    def off(self) -> None:
        self._led.off()

    def close(self) -> None:
        self._led.close()
