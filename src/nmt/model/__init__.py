"""The Transformer encoder-decoder: ``Transformer.encode`` / ``Transformer.decode(..., cache)``."""
from nmt.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "Transformer"]
