"""Shared fixtures: hypothesis profiles, seeded random data, layout variants, thread restore."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# reference.py sits beside the tests; make it importable whatever the rootdir/import mode.
sys.path.insert(0, str(Path(__file__).parent))

# Few examples on CI (the suite must stay fast on 2 cores); more when run by hand.
settings.register_profile(
    "ci", max_examples=8, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("local", max_examples=40, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "local")


@pytest.fixture
def rng(request):
    # One seed per test id: reproducible, yet different tests see different data.
    return np.random.default_rng(_stable_seed(request.node.nodeid))


def _stable_seed(text):
    h = 2166136261
    for ch in text.encode():
        h = ((h ^ ch) * 16777619) % (2**32)
    return h


@pytest.fixture
def restore_threads():
    import rsnorm as rn

    before = rn.get_num_threads()
    yield
    rn.set_num_threads(before)
