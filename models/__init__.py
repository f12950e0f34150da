"""Tokenizer models (``vqlib.models``): image / audio encoders-decoders around any vqlib quantizer."""

from .hub import HubMixin

__all__ = ["HubMixin"]
