"""pytest configuration: deterministic hypothesis profile, fixed torch threads."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
try:  # the GPU machines' image has pytest but not hypothesis: their tests do not need it
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    settings = None

sys.path.insert(0, os.path.dirname(__file__))  # tests/_acam_helpers.py

import _toy_method  # noqa: E402,F401  registers "toy_l1": the method contract test covers it

# The tests use tiny tensors: one intra-op thread avoids thread wake-up overhead (which
# dominates, and is erratic, on a 2-core machine with other work running).
torch.set_num_threads(int(os.environ.get("ACAMKD_TEST_THREADS", "1")))

if settings is not None:
    settings.register_profile(
        "acamkd",
        max_examples=25,
        deadline=None,
        derandomize=True,  # same examples on every run: the suite is deterministic
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "acamkd"))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state (module inits draw from it)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def module_tmp_dir(tmp_path_factory):
    """``module_tmp_dir(name)``: a new folder for a module-scoped fixture's runs, deleted when the
    module's tests end. pytest deletes a passing test's ``tmp_path`` (``tmp_path_retention_policy``
    in pyproject.toml) but keeps ``tmp_path_factory`` folders to the end of the session, and the
    detector runs these fixtures hold are hundreds of MB each."""
    made = []

    def mktemp(name: str):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
