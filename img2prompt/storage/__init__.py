"""Storage: how the project writes — atomic, fsynced files (``files``), the manifest of what
it wrote in each folder and the locks (``ownership``), tensors + JSON (``checkpoints``)."""
