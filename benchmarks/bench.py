"""Run the benchmark from a checkout: ``python benchmarks/bench.py [options]``.

Same as ``visionbatch bench``; see benchmarks/RESULTS.md for the commands and figures.
"""

import sys

from visionbatch.bench import main

if __name__ == "__main__":
    sys.exit(main())
