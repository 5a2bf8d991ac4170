"""conveyor: a continuous fine-tuning daemon for causal language models."""

__version__ = "0.1.0"
