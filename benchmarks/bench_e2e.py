"""The end-to-end GPU-hour benchmark: each published recipe's training step with fastssl's
kernels and with the original ops, and the GPU-hours saved (fastssl.train.bench_e2e; the
same as ``fastssl bench e2e``).

    python benchmarks/bench_e2e.py                          # every recipe, on a CUDA GPU
    python benchmarks/bench_e2e.py --recipe dino-vits16     # one recipe
    python benchmarks/bench_e2e.py --smoke                  # tiny, on the CPU
"""

import sys

from fastssl.train.bench_e2e import main

if __name__ == "__main__":
    sys.exit(main())
