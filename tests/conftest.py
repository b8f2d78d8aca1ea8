"""Suite-wide settings.

The tests compile many tiny models once each; XLA's backend optimisation at level 0 compiles them
about 3x faster on CPU and does not change float semantics (no fast-math), so parity tolerances
hold. Benchmarks (scripts/benchmark.py) run with XLA's defaults. Set before JAX is imported.
"""

import os

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# The suite runs on the CPU. libtpu (a test dependency, for the ahead-of-time TPU compiles, which need no TPU
# backend) would otherwise be probed by every JAX process and print its warnings on stderr, where the CLI tests
# expect exactly one line. Subprocesses inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# CLI runs turn on a persistent compilation cache in the user's cache folder; tests keep out of it (the cache
# test points it at a temporary folder).
os.environ.setdefault("VLDM_COMPILATION_CACHE", "0")
