"""Hardening tests: one hypothesis profile for every property test here.

A fixed seed (hypothesis' ``seed``; ``derandomize`` would switch the database off), a bounded number of examples
and a recorded example database (``tests/hardening/.hypothesis-db``, committed): a failure found once is
replayed first on every later run. Set ``HYPOTHESIS_PROFILE=hardening-long`` for a longer hunt (random seed,
10x the examples) when changing a parser.
"""

import os
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.database import DirectoryBasedExampleDatabase

DB = DirectoryBasedExampleDatabase(str(Path(__file__).parent / ".hypothesis-db"))
_COMMON = dict(database=DB, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
# Debugging a parser: HARDENING_NO_SHRINK=1 reports failures unshrunk (shrinking many distinct ones takes minutes).
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
        if PROFILE == "hardening":
            return seed(SEED)(settings(base, max_examples=n)(test))
        return settings(base)(test)

    return wrap
