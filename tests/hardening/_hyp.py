"""Hardening tests: one hypothesis profile for every property test here.

A fixed seed (hypothesis' ``seed``; ``derandomize`` would switch the database off), a bounded number of examples
and a recorded example database (``tests/hardening/.hypothesis-db``, committed), replayed before any new example:

- every failure hypothesis ever found and saved (its primary corpus), and
- one recorded input per distinct outcome of each parser (:func:`outcome` gives each refusal message kind its own
  ``target`` label, so hypothesis' pareto front keeps the smallest input reaching each: accepted, truncated header,
  offsets past the end, unknown dtype, ...).

The database is read-only unless ``HARDENING_DB_WRITE=1``, so test runs (CI's included) never dirty the checkout.
Record it again after changing a parser or a test (a test's entries are keyed by its source):

    rm -rf tests/hardening/.hypothesis-db/*/ && HARDENING_DB_WRITE=1 python -m pytest -q tests/hardening/test_*_props.py

Set ``HYPOTHESIS_PROFILE=hardening-long`` for a longer hunt (random seed, 10x the examples) when changing a parser;
with ``HARDENING_DB_WRITE=1`` what it finds is kept.
"""

import os
import re
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed, settings, target
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

DB_PATH = Path(__file__).parent / ".hypothesis-db"
DB = DirectoryBasedExampleDatabase(str(DB_PATH))
if not os.environ.get("HARDENING_DB_WRITE"):
    DB = ReadOnlyDatabase(DB)
_COMMON = dict(database=DB, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
# Debugging a parser: HARDENING_NO_SHRINK=1 reports failures unshrunk (shrinking many distinct ones takes minutes).
# No target phase: outcome()'s labels are for the database only, not to be hill-climbed (extra examples).
_COMMON["phases"] = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink, Phase.explain]
if os.environ.get("HARDENING_NO_SHRINK"):
    _COMMON["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]
settings.register_profile("hardening", max_examples=60, **_COMMON)
settings.register_profile("hardening-long", derandomize=False, max_examples=600, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "hardening")


SEED = 20261206


def examples(n: int):
    """Decorator (outermost, above ``@given``): the profile with ``n`` examples and the fixed seed in the default
    (CI) profile; the long profile keeps its own count and a random seed."""
    base = settings.get_profile(PROFILE)

    def wrap(test):
        # seed() inside settings(): hypothesis' seed decorator also sets database=None, so applied last (as this
        # did until the database was found empty) it switched the recorded database off.
        if PROFILE == "hardening":
            return settings(base, max_examples=n)(seed(SEED)(test))
        return settings(base)(test)

    return wrap


def outcome(error: BaseException | None = None, path=None) -> None:
    """Records how one example ended, for the example database: one ``target`` label per kind of outcome
    ("accepted", or the error's class and message with the file name, quoted text and numbers blanked), so the
    recorded corpus holds the smallest input that reached each. Call once per example, inside a ``@given`` test."""
    if error is None:
        label = "accepted"
    else:
        message = str(error)
        if path is not None:
            message = message.replace(str(path), "<file>")
        message = re.sub(r"'[^']*'|\"[^\"]*\"|\(.*?\)|\[.*?\]|-?\d+(\.\d+)?(e-?\d+)?", "_", message)
        label = f"{type(error).__name__}: {message[:48]}"
    target(1.0, label=label)
