"""``python -m deepseek_ptq.bench``: the GPU benchmark (deepseek_ptq/devtools/bench.py)."""

import sys

from deepseek_ptq.devtools.bench import main

if __name__ == "__main__":
    sys.exit(main())
