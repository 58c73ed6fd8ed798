"""Shared test setup: under pytest-xdist (``make test``), each worker uses one torch thread, so two
workers share the two cores instead of each oversubscribing them."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
