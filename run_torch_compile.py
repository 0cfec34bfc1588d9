"""DynamicCrossEncoder: x16 bucket padding, token-length sorting, inductor-compiled forward;
`--packed` for the padding-free path. Scores are compared with an untimed CrossEncoder run.

    python run_torch_compile.py                      # padded buckets, compiled
    python run_torch_compile.py --packed             # padding-free, varlen attention
    python run_torch_compile.py --compile-mode default --model synthetic-tiny --device cpu
"""

import benchmark


def setups(cfg, path, dtype):
    # The baseline row gives every optimized path a reference on the same inputs; it is timed
    # like the others so its cost is visible, and the table's speedup column is against it.
    return [benchmark.baseline_setup(cfg, path, dtype), benchmark.dynamic_setup(cfg, path, dtype, packed=cfg.packed)]


def main(argv=None):
    return benchmark.main("DynamicCrossEncoder latency (torch.compile)", setups, argv=argv)


if __name__ == "__main__":
    main()
