import os
import sys

import torch

# tests/oracles.py is imported as a plain module by the test files.
sys.path.insert(0, os.path.dirname(__file__))

# The tests use tiny tensors, for which intra-op threads only add spin-up and contention overhead
# (measured 5-50x slower with 2 threads on the 2-core CI machine when anything else runs).
# Tests that exercise a kernel's parallel path set the thread count themselves.
torch.set_num_threads(1)
