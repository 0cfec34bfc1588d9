"""Max |logit diff| of DynamicCrossEncoder against CrossEncoder fp32, per family and path, on the hard
pairs of tests/test_families.py (the test asserts each at 1e-5; this prints what was measured).

    python results/family_parity.py results/cpu-epyc-2core/family-parity.json

Tiny random-weight twins on the CPU: the differences are valid, the scores are not meaningful.
"""

import json
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import CrossEncoder  # noqa: E402

import bench_utils  # noqa: E402
import twins  # noqa: E402
from dynamic_cross_encoder import DynamicCrossEncoder  # noqa: E402
from helpers import IDENTITY  # noqa: E402
from test_families import FAMILIES, hard_pairs, reference_batch  # noqa: E402


def main(out: str) -> None:
    pairs, rows = hard_pairs(), []
    for family in ["xlm-roberta"] + FAMILIES:
        path = twins.family_twin_dir(family, "tiny")
        ce = CrossEncoder(path, device="cpu", local_files_only=True, model_kwargs={"dtype": torch.float32})
        ref = ce.predict(pairs, activation_fn=IDENTITY, batch_size=reference_batch(family))
        row = {"family": family, "architecture": twins.FAMILY_TWINS[family].architecture, "diff": {}}
        for packed in (False, True):
            for compile in (False, True):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = DynamicCrossEncoder(path, device="cpu", local_files_only=True, packed=packed, compile=compile,
                                               model_kwargs={"dtype": torch.float32})
                out_ = model.predict(pairs, activation_fn=IDENTITY, batch_size=8)
                key = f"{'packed' if model.packed else 'padded'}-{'compiled' if compile else 'eager'}"
                row["diff"][key] = float(np.abs(out_ - ref).max())
                row["describe" if packed else "describe_padded"] = model.describe()
        row["max_diff"] = max(row["diff"].values())
        row["logit_std"] = float(ref.std())
        rows.append(row)
        print(f"{family:16s} max |logit diff| {row['max_diff']:.1e}  ({row['diff']})", flush=True)
    env = bench_utils.environment("cpu", torch.float32)
    with open(out, "w") as f:
        json.dump({"pairs": len(pairs), "environment": env.__dict__, "families": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "family-parity.json")
