"""Hardware edges of the appliance: ALSA capture and playback, GPIO, the clock, and the
simulated HAT that stands in for all of them on a machine without the hardware."""
