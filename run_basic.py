"""Baseline: sentence-transformers CrossEncoder as users run it (flash-attn when installed).

    python run_basic.py                       # the hub model, or its random twin offline
    python run_basic.py --model synthetic-tiny --device cpu --runs 3
"""

import benchmark


def setups(cfg, path, dtype):
    return [benchmark.baseline_setup(cfg, path, dtype)]


def main(argv=None):
    return benchmark.main(
        "CrossEncoder baseline latency",
        setups,
        exclude=("packed", "max_tokens_per_batch", "compile_mode"),
        argv=argv,
    )


if __name__ == "__main__":
    main()
