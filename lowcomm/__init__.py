"""lowcomm: fault-tolerant, low-communication training of one model on GPUs that are far apart.

Inside a replica (a group of GPUs close together) training is ordinary FSDP under torchrun. Between
replicas, lowcomm exchanges compressed pseudo-gradients every few hundred steps (the DiLoCo family),
keeps going when a peer dies or joins, checkpoints without stalling, and rebuilds lost pipeline stages.

Glossary (used the same way in every module):
    replica         one copy of the model, trained by one group of nearby GPUs (one torchrun job,
                    admitted into the run and evicted from it as one unit).
    peer            one process taking part in the WAN collectives (one per replica, or one per
                    FSDP shard of a replica).
    peer_group      peers that all-reduce together; under FSDP, shard i of every replica.
    master          the process that tracks membership and the ring order; it holds no tensors.
    inner_step      one ordinary optimizer step on local data.
    outer_step      one synchronisation among replicas, every ``sync_every`` inner steps.
    pseudogradient  outer parameters at the start of a round minus local parameters at its end.
    shared state    named tensors plus a revision that every peer keeps bit-identical.
    codec           an encoder/decoder for tensors on the wire or on disk (lowcomm.compression).

Units are in names: ``timeout_s``, ``*_bytes``, ``bandwidth_bps``; counts start with ``num_``.
"""

from __future__ import annotations

from lowcomm._version import __version__
from lowcomm.errors import LowcommError
from lowcomm.trainer import Run, RunConfig, Trainer, init

__all__ = ["LowcommError", "Run", "RunConfig", "Trainer", "__version__", "init"]
