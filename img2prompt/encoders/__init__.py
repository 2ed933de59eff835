"""Encoders: images (``image``) and prompts (``text``) into vectors, and the batched
extraction with its on-disk cache (``embeddings``)."""
