"""Convert a Hugging Face DeepSeek-V3/R1/V3.1 checkpoint into DeepSeek's model{rank}-mp{W}.safetensors shards.

    python scripts/convert_hf.py HF_DIR --out DIR --mp W

See deepseek_ptq/hf/convert.py; the converted folder is what model.ckpt_dir takes.
"""

import sys

from deepseek_ptq.hf.convert import main

if __name__ == "__main__":
    sys.exit(main())
