"""A pytest plugin that tells torch a CUDA GPU is present (``pytest -p tests.cuda_present``):
what a GPU machine does to the tests that do not ask for a device. They must still pass,
pinned to the CPU by ``--device auto``'s test setting (conftest). Nothing runs on a GPU: a
test that did would fail here, which is the point."""

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
