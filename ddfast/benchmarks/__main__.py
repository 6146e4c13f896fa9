"""``python -m ddfast.benchmarks``: the benchmark harness (:mod:`ddfast.benchmarks.harness`)."""

import sys

from ddfast.benchmarks.harness import main

sys.exit(main())
