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
        if case.get("torch"):
            run_torch(case, rank, folder)
            continue
        m = sparsa.compile(case["source"], target=case["target"], expert_parallel=dist.group.WORLD,
                           passes=case.get("passes"))
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
        if case.get("grad"):  # reverse mode: this rank's pullback
            y, pullback = m.vjp(x)
            grads = pullback(inputs["dy"][lo:hi])
            np.savez(os.path.join(folder, f"{case['name']}.{rank}.npz"), y=y, ir=np.array(m.ir(grad=True)),
                     stats=np.array(json.dumps(m.stats()["all_to_all"])), **{f"d_{k}": v for k, v in grads.items()})
            continue
        y = m(x)
        for _ in range(case.get("repeat", 1) - 1):  # the same call again: the plan and buffers are per call
            y = m(x)
        stats = m.stats()["all_to_all"]
        np.savez(os.path.join(folder, f"{case['name']}.{rank}.npz"), y=y,
                 stats=np.array(json.dumps(stats)), ir=np.array(m.ir()))
    dist.barrier()
    dist.destroy_process_group()


def mixtral_block(seed: int) -> object:
    """transformers' Mixtral MoE block (grouped_mm experts), small, the same on every rank."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block


def run_torch(case: dict, rank: int, folder: str) -> None:
    """The block under torch.compile(backend=sparsa, expert_parallel) or swapped for a Sparsa block."""
    import torch
    import torch.distributed as dist

    from sparsa.runtime.torch_backend import SparsaBackend
    from sparsa.runtime.torch_moe import swap_moe_blocks

    block = mixtral_block(case["seed"])
    lo, hi = case["splits"][rank], case["splits"][rank + 1]
    x = torch.from_numpy(np.load(os.path.join(folder, case["name"] + ".inputs.npz"))["x"][lo:hi])[None]
    with torch.no_grad():
        if case["torch"] == "compile":
            backend = SparsaBackend({"target": case["target"], "expert_parallel": dist.group.WORLD})
            y = torch.compile(block, backend=backend)(x)
            stats = backend.exchange.counters.as_dict()
            ir = "".join(str(p.module) for p in backend.partitions)
        else:
            holder = torch.nn.Sequential(block)
            swap_moe_blocks(holder, case["target"], freezing=case["torch"] == "swap-frozen",
                            expert_parallel=dist.group.WORLD)
            y = holder(x)
            model = next(iter(holder[0]._models.values()))
            stats, ir = model.stats()["all_to_all"], model.ir()
    np.savez(os.path.join(folder, f"{case['name']}.{rank}.npz"), y=y[0].numpy(), stats=np.array(json.dumps(stats)),
             ir=np.array(ir))


if __name__ == "__main__":
    main()
