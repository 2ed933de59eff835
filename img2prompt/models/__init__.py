"""Models: the mapper (image embedding -> prompt embedding), the prompt decoder and its
decoding strategies (``generation``), and their training loops (``training``)."""
