"""Fuzzing every public function (issue 7): shapes with 0- and 1-sized dims, strides (slices,
negative steps, transposes, broadcast, Fortran order, read-only), dtypes, axes and parameter
values, valid and hostile. Property: a correct result (against the float64 reference), or the
documented exception (``ValueError`` / ``TypeError``) exactly where the input is invalid.
``PanicException`` (a ``BaseException``), any other exception type, or a crash fails.

Profiles: the default (CI) runs a bounded, derandomized number of examples per function; set
``RSNORM_FUZZ=long`` for a long local run (``--hypothesis-show-statistics`` prints the counts).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import rsnorm as rn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .registry import ENTRIES, Draw, exempt, public_ops

LONG = os.environ.get("RSNORM_FUZZ") == "long"
FUZZ = settings(
    max_examples=int(os.environ.get("RSNORM_FUZZ_EXAMPLES", "3000")) if LONG else 30,
    deadline=None,
    derandomize=not LONG,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def test_every_public_name_is_registered():
    missing = [n for n in rn.__all__ if not exempt(n) and n not in ENTRIES]
    assert not missing, f"public functions without a fuzzing entry in registry.py: {missing}"


def test_registry_has_no_stale_guards():
    # Entries for ops that exist but are not public would be fuzzing something users cannot call.
    hidden = [n for n in ENTRIES if hasattr(rn, n) and n not in rn.__all__]
    assert not hidden, hidden


def run_case(case):
    before = [None if a is None else np.array(a, copy=True) for a in case.frozen]
    try:
        res = case.fn(*case.args, **case.kwargs)
    except (ValueError, TypeError) as e:
        assert str(e), "errors must have a message"
        if case.expect is None:
            raise AssertionError(f"valid call raised {type(e).__name__}: {e}") from e
        if case.expect == "either":
            assert isinstance(e, ValueError), e
        else:
            assert isinstance(e, case.expect), (type(e), case.expect, e)
    else:
        if case.expect not in (None, "either"):
            raise AssertionError(f"expected {case.expect.__name__}, got a result")
        # The float64 references may divide by zero or average empty slices on purpose.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            case.check(res)
    for a, b in zip(case.frozen, before):
        if a is not None:
            assert np.array_equal(np.asarray(a), b, equal_nan=True), "an input was modified"


@pytest.mark.parametrize("name", public_ops())
@FUZZ
@given(data=st.data())
def test_fuzz(name, data):
    entry = ENTRIES[name]  # KeyError = a public function nobody registered
    case = entry.build(Draw(data.draw))
    run_case(case)


@pytest.mark.parametrize("name", public_ops())
@pytest.mark.parametrize("seed", range(3))
def test_seeded_cases(name, seed):
    """The same builders without hypothesis: reproducible by (name, seed) alone."""
    run_case(ENTRIES[name].build(Draw(seed=seed)))
