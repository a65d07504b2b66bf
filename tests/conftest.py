"""Test-wide settings: CPU only, so results are the same on every machine that runs CI."""

import os
import tempfile

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the whole session: the xdist workers and every
# subprocess (CLI runs, kill/resume, notebooks, multi-device scripts) inherit it, so the
# same step compiled again in another process is loaded instead (compiles dominate this
# suite's time on 2 cores). Only compilations over JAX's 1 s threshold are stored. The
# same program loads the same executable, so bitwise comparisons are unaffected; tests
# of the cache itself and the benchmarks' cold start set their own directories.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxtrain-xla-cache-"))
