"""Audio path of linerec: sample rings, PCM helpers, the Opus encoder and the Ogg Opus writer."""
