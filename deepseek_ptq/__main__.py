"""``python -m deepseek_ptq``: the Hydra app (joined ranks other than 0 keep no run directory of their own)."""

from __future__ import annotations

import shutil
import sys
import tempfile


def cli() -> None:
    from deepseek_ptq.pipeline.launch import joined_rank

    joined = joined_rank()
    scratch = None
    if joined is not None and joined.rank != 0:
        # Rank 0's run directory is shared with this rank after start-up; Hydra writes nothing here, and
        # the folder goes when the rank ends (what a rank records before it has rank 0's folder goes with it).
        scratch = tempfile.mkdtemp(prefix="deepseek_ptq_rank")
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    from deepseek_ptq.pipeline.app import main

    try:
        main()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    cli()
