"""crossdiff: find what chat fine-tuning changed inside a language model, with crosscoders."""

__version__ = "0.1.0"
