"""qgaproxy: one QEMU guest-agent channel, many transparent clients."""

__version__ = "0.1.0"
