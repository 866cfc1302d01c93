"""A README-style torchrun script for tests/trainer/test_init.py: FSDP2 + DiLoCo after lowcomm.init().

Reads torchrun's variables and LOWCOMM_*; LOWCOMM_TEST_DELAY_S delays this rank between its
process group's rendezvous and lowcomm.init() (a rank slow to join). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import lowcomm
from lowcomm.diloco import DiLoCo, OuterConfig

torch.set_num_threads(1)
dist.init_process_group("gloo")  # the script's own; lowcomm.init() uses it
arrived = time.time() + float(os.environ.get("LOWCOMM_TEST_DELAY_S", "0"))
time.sleep(max(0.0, arrived - time.time()))
run = lowcomm.init()
accepted = time.time()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
fully_shard(model)
inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
trainer = DiLoCo(model, inner, run.comm, config=OuterConfig(method="diloco", sync_every=2))
gen = torch.Generator().manual_seed(100 * len(run.replica_id) + run.shard_index)
for _ in range(6):
    x = torch.randn(4, 8, generator=gen)
    model(x).pow(2).mean().backward()
    trainer.step()
trainer.finish()
line = {
    "replica": run.replica_id,
    "shard": run.shard_index,
    "arrived": arrived,
    "accepted": accepted,
    "num_replicas": run.num_replicas,
    "outer_steps": trainer.stats.outer_steps,
    "hash": trainer.outer_hash(),
}
print("RESULT " + json.dumps(line), flush=True)
run.close()
dist.destroy_process_group()
