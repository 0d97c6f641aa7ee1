"""``python -m deepseek_ptq.report``: a sweep as one table (deepseek_ptq/analysis/report.py)."""

import sys

from deepseek_ptq.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
