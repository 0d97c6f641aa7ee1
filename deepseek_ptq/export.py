"""``python -m deepseek_ptq.export``: export a run as a Hugging Face checkpoint (deepseek_ptq/hf/export.py)."""

import sys

from deepseek_ptq.hf.export import main

if __name__ == "__main__":
    sys.exit(main())
