"""``python -m deepseek_ptq.compare``: compare two runs' amax and evaluations (deepseek_ptq/analysis/compare.py)."""

import sys

from deepseek_ptq.analysis.compare import main

if __name__ == "__main__":
    sys.exit(main())
