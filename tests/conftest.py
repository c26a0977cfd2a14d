"""Test-session settings: offline hubs, and one torch thread per pytest-xdist worker.

With two xdist workers on two cores, torch's default of one thread per core makes the workers
oversubscribe the CPU, which was measured at up to 50x slower per forward pass here.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
