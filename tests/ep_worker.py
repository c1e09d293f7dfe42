"""One rank of an expert-parallel test run (spawned by test_expert_parallel.py, bench/expert_parallel.py):
`python ep_worker.py RANK WORLD PORT FOLDER` runs every case of FOLDER/cases.json over gloo on 127.0.0.1 and
writes each case's output and exchange counters to FOLDER/<case>.<rank>.npz."""

from __future__ import annotations

import datetime
import json
import os
import sys

import numpy as np


def main() -> None:
    rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import torch.distributed as dist

    import sparsa

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    with open(os.path.join(folder, "cases.json")) as f:
        cases = json.load(f)
    for case in cases:
        os.environ["SPARSA_DETERMINISTIC"] = "1" if case.get("deterministic") else "0"
        m = sparsa.compile(case["source"], target=case["target"], expert_parallel=dist.group.WORLD)
        inputs = np.load(os.path.join(folder, case["name"] + ".inputs.npz"))
        if case.get("weights"):
            weights = dict(np.load(os.path.join(folder, case["name"] + ".weights.npz")))
            if case.get("blocks"):  # this rank's block of each expert weight, not the full model
                weights = {k: np.array_split(v, world)[rank] if k in m.shards else v for k, v in weights.items()}
            m.load_weights(weights)
        else:
            m.init_weights(case["seed"])
        lo, hi = case["splits"][rank], case["splits"][rank + 1]
        x = inputs["x"][lo:hi]
        y = m(x)
        for _ in range(case.get("repeat", 1) - 1):  # the same call again: the plan and buffers are per call
            y = m(x)
        stats = m.stats()["all_to_all"]
        np.savez(os.path.join(folder, f"{case['name']}.{rank}.npz"), y=y,
                 stats=np.array(json.dumps(stats)), ir=np.array(m.ir()))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
