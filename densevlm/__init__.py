"""densevlm: region-language alignment of vision-language models for open-vocabulary dense prediction."""

__version__ = "0.1.0"
