"""peftlab: fine-tune transformer encoders for text classification, full or parameter-efficient."""

__version__ = "0.1.0"
