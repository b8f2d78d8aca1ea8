"""Walking a traced program: every equation of a jaxpr and of the jaxprs nested in it (scans, custom rules)."""

from __future__ import annotations

from typing import Iterator

import jax


def all_eqns(fn, *args) -> Iterator:
    """Every equation of ``jax.make_jaxpr(fn)(*args)``, nested jaxprs included."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)
