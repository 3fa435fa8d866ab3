"""Dataset-wide CNN visualization pipeline."""

__version__ = "0.1.0"
