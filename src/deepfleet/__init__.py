"""deepfleet: compress neural networks for small sensing devices and prove it on real hardware."""

__version__ = "0.1.0"
