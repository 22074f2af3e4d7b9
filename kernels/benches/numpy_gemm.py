"""numpy/OpenBLAS f32 GEMM at the shapes of benches/gemm.rs, for a side-by-side comparison in the same
session (run with OPENBLAS_NUM_THREADS=2, the bench thread budget). Prints GFLOP/s median (min-max) of
7 repetitions of y = x @ w.T, each repetition timed over enough calls to last about 0.2 s, and the
median GFLOP per CPU-second of this process (all OpenBLAS threads; robust to other jobs on the machine).
Optional arguments MxNxK restrict it to those shapes (the gemm bench's summary calls it that way)."""

import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
import numpy as np  # noqa: E402

SHAPES = [(512, 512, 512), (1024, 1024, 1024), (256, 768, 256), (256, 256, 768), (256, 512, 256), (256, 256, 512)]


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    shapes = [tuple(int(d) for d in a.split("x")) for a in sys.argv[1:]] or SHAPES
    for m, n, k in shapes:
        x = rng.uniform(-1, 1, (m, k)).astype(np.float32)
        w = rng.uniform(-1, 1, (n, k)).astype(np.float32)
        y = np.empty((m, n), np.float32)
        flop = 2.0 * m * n * k
        np.matmul(x, w.T, out=y)
        calls = max(1, int(0.2 / max(1e-6, _time(lambda: np.matmul(x, w.T, out=y)))))
        rates = []
        cpu_rates = []
        for _ in range(7):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                np.matmul(x, w.T, out=y)
            rates.append(flop * calls / (time.perf_counter() - t0) / 1e9)
            cpu_rates.append(flop * calls / max(1e-9, time.process_time() - c0) / 1e9)
        rates.sort()
        cpu_rates.sort()
        print(
            f"numpy_xwt {m}x{n}x{k}: {rates[3]:.1f} GFLOP/s ({rates[0]:.1f}-{rates[-1]:.1f}), "
            f"{cpu_rates[3]:.1f} GFLOP/cpu-s"
        )


def _time(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
