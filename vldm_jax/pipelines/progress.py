"""Host-side progress for compiled sampling loops.

A compiled loop calls one fixed host function per step (:func:`advance`, through ``jax.debug.callback``),
so showing or hiding a bar never forces a recompile; :func:`denoising_bar` installs the bar it advances.
"""

from __future__ import annotations

import contextlib

_BAR: list = [None]


def advance(_step) -> None:
    """The per-step callback: advances the installed bar, if any (steps may arrive out of order)."""
    if _BAR[0] is not None:
        _BAR[0].update(1)


@contextlib.contextmanager
def denoising_bar(total: int, enabled: bool = True):
    """Shows a tqdm bar of ``total`` steps while the block runs (nothing when not ``enabled``)."""
    if enabled:
        from tqdm.auto import tqdm

        _BAR[0] = tqdm(total=total, desc="denoising")
    try:
        yield
    finally:
        if _BAR[0] is not None:
            _BAR[0].close()
            _BAR[0] = None
