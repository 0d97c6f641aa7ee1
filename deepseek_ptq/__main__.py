"""``python -m deepseek_ptq``: the Hydra app (joined ranks other than 0 keep no run directory of their own)."""

from __future__ import annotations

import sys
import tempfile


def cli() -> None:
    from deepseek_ptq.pipeline.launch import joined_rank

    joined = joined_rank()
    if joined is not None and joined.rank != 0:
        # Rank 0's run directory is shared with this rank after start-up; Hydra writes nothing here.
        sys.argv += [f"hydra.run.dir={tempfile.mkdtemp(prefix='deepseek_ptq_rank')}", "hydra.output_subdir=null"]
    from deepseek_ptq.pipeline.app import main

    main()


if __name__ == "__main__":
    cli()
