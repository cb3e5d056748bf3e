"""Config-driven experiments for classifying microscope images of fungi."""

__version__ = "0.1.0"
