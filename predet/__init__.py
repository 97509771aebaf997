"""PreDet: large-scale weakly supervised pre-training for detection."""

__version__ = "0.1.0"
