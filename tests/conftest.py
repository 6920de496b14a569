"""Shared test settings."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The tiny models' tensors gain nothing from intra-op threads; on shared CI cores the threads mostly
    wait for each other (measured: 5x slower under load), so each test module runs on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
