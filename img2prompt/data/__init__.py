"""Data: the dataset folder (``dataset``), decoding images (``images``), the generated default
data (``synth``), and bringing real images in (``importers``, ``download``, with
``archives`` and ``png_text`` for untrusted files)."""
