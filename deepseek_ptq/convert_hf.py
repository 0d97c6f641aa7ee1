"""``python -m deepseek_ptq.convert_hf``: convert a Hugging Face checkpoint into DeepSeek's MP shards (deepseek_ptq/hf/convert.py)."""

import sys

from deepseek_ptq.hf.convert import main

if __name__ == "__main__":
    sys.exit(main())
