"""Fixtures every test gets: fresh seeds, a clean ``MEDCARE_*`` environment, GPU tests skipped without CUDA.
Shared test code lives in :mod:`tests.helpers` and :mod:`tests.oracle`."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

# The triton backend's kernels run on the CPU under the interpreter: the switch must be set before triton
# decorates them, i.e. before medcare_kernels.backends.triton is first imported. On a machine with a GPU
# the kernels run compiled and the variable is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from medcare_kernels.dispatch import KNOBS  # noqa: E402

_RUN_SEED = int(os.environ.get("MEDCARE_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"medcare test seed: MEDCARE_TEST_SEED={_RUN_SEED}"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs each run (seed printed in the header; set MEDCARE_TEST_SEED to replay)."""
    torch.manual_seed(_RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Every runtime knob of medcare_kernels.dispatch.KNOBS unset: each test starts from the defaults."""
    for knob in KNOBS:
        if knob.scope == "runtime":
            monkeypatch.delenv(knob.name, raising=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run the kernels for real; without a CUDA device they skip cleanly."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
