"""vray: fine-tune and serve vision-language models on Ray."""

__version__ = "0.1.0"
