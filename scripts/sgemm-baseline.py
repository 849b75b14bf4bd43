#!/usr/bin/env python3
"""OpenBLAS's sgemm (through numpy) on the shape of one head's attention profile, for comparison with
`tessera bench-kernels` (`profile f32: … GFLOP/s`): a multi-image prompt of 2970 tokens, head size 128.

Run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 scripts/sgemm-baseline.py` where those
variables are set, so OpenBLAS picks its own kernel for the CPU. Needs numpy and threadpoolctl."""
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

m, d = 2970, 128
rng = np.random.default_rng(1)
q = rng.standard_normal((m, d), dtype=np.float32)
k = rng.standard_normal((m, d), dtype=np.float32)
blas = [(i["internal_api"], i.get("architecture"), i.get("version")) for i in threadpool_info()]
print(f"BLAS: {blas}")
for threads in (1, 2):
    with threadpool_limits(threads):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            q @ k.T  # the whole square; the causal profile needs half of it, plus a softmax per row
            best = min(best, time.perf_counter() - start)
    print(f"sgemm {m}x{d} @ {d}x{m}, {threads} thread(s): {2 * m * m * d / best / 1e9:.1f} GFLOP/s")
