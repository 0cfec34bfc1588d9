"""Baseline, bucketed DynamicCrossEncoder and the packed path on identical inputs, one table; on a
CPU also CrossEncoder on OpenVINO when optimum-intel is installed (else a note says how to add it).

    CUDA_VISIBLE_DEVICES=0 python run_combined.py
    python run_combined.py --model synthetic-tiny --device cpu --num-pairs 64 --runs 3 --json out.json
"""

import benchmark


def setups(cfg, path, dtype):
    return [
        benchmark.baseline_setup(cfg, path, dtype),
        benchmark.dynamic_setup(cfg, path, dtype, packed=False),
        benchmark.dynamic_setup(cfg, path, dtype, packed=True),
        *benchmark.openvino_setups(cfg, path),
    ]


def main(argv=None):
    return benchmark.main("Cross-encoder latency: baseline vs DynamicCrossEncoder", setups, exclude=("packed",),
                          argv=argv)


if __name__ == "__main__":
    main()
