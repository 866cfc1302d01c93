"""Pipeline replicas: which peer holds which (stage, replica) slot, and DiLoCo per stage group.

With ``PipelineConfig.num_replicas = R`` the run holds R copies of the pipeline. Peer group ``s``
is stage ``s`` of every replica; a slot is ``(stage, replica)``. Every peer derives the same slot
of every peer from the master's world alone (``assign_slots``): at the start, a peer's replica is
its rank in its group (join order); after a loss, the survivors keep theirs and each new peer of a
group takes that group's free replica indices in join order. A replacement learns the mapping from
the recovery header, so it never has to guess it.

Each stage's replicas run DiLoCo among themselves (``OuterState``), exactly as FSDP shard groups
do: every ``outer_every`` steps the stage all-reduces its pseudo-gradient (outer parameters minus
its inner parameters) over its peer group, steps an outer Nesterov SGD on the outer parameters
and restarts its inner parameters from them. A lost slot with a surviving replica of its stage is
rebuilt as a copy of that survivor (``rules.Rule.REPLICA``): its outer parameters (never the
survivor's mid-round inner ones), the outer optimizer's momentum, and the inner optimizer's
state; nothing is averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lowcomm.comm import Communicator
from lowcomm.recovery.rules import clone_state

__all__ = ["OuterState", "Slot", "assign_slots", "missing_slots"]

Slot = tuple[int, int]  # (stage, replica)


def assign_slots(
    world: Iterable[tuple[str, int]], previous: Mapping[str, Slot], num_replicas: int
) -> dict[str, Slot]:
    """Peer id -> slot for the peers of ``world`` (``(peer_id, group)`` in join order).

    Peers in ``previous`` keep their slot; a new peer takes the lowest free replica index of its
    group. Peers beyond ``num_replicas`` in a group get no slot (the next recovery admits them
    as nothing: the runtime refuses to start with them). A pure function: every peer agrees.
    """
    out: dict[str, Slot] = {}
    ordered = list(world)
    for pid, group in ordered:
        if pid in previous and previous[pid][0] == group:
            out[pid] = previous[pid]
    for pid, group in ordered:
        if pid in out:
            continue
        taken = {r for s, r in out.values() if s == group}
        free = [r for r in range(num_replicas) if r not in taken]
        if free:
            out[pid] = (group, free[0])
    return out


def missing_slots(slots: Mapping[str, Slot], num_stages: int, num_replicas: int) -> set[Slot]:
    """The slots of ``num_stages`` x ``num_replicas`` that no peer in ``slots`` holds."""
    held = set(slots.values())
    return {(s, r) for s in range(num_stages) for r in range(num_replicas) if (s, r) not in held}


class OuterState:
    """One stage's DiLoCo outer parameters and outer optimizer (Nesterov SGD).

    ``synced_for`` is the step whose outer sync this stage already applied, so a retried step
    never applies it twice (the sync runs at the start of the step's attempt; the all-reduce
    is all-or-nothing over the group, so either every replica applied it or none did).
    """

    def __init__(self, module: nn.Module, *, lr: float, momentum: float) -> None:
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p.detach().clone() for p in module.parameters()]
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=True)
        self.synced_for = -1

    def sync(self, module: nn.Module, comm: Communicator, *, step: int, timeout_s: float) -> None:
        """The outer step: average the group's pseudo-gradients, step, restart the inner ones."""
        inner = list(module.parameters())
        with torch.no_grad():
            flat = torch.cat(
                [(o - p.detach()).reshape(-1) for o, p in zip(self.params, inner, strict=True)]
            )
            comm.all_reduce(flat, "avg", timeout_s=timeout_s)
            offset = 0
            for o in self.params:
                n = o.numel()
                o.grad = flat[offset : offset + n].view_as(o).clone()
                offset += n
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for o, p in zip(self.params, inner, strict=True):
                p.copy_(o)
        self.synced_for = step

    def state(self) -> dict[str, Any]:
        """What a replica copy transfers: the outer parameters by name, the outer optimizer's
        state, ``synced_for`` (cloned)."""
        return {
            "params": {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)},
            "optimizer": clone_state(self.optimizer.state_dict()),
            "synced_for": self.synced_for,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        """Takes a survivor's ``state()`` (bit for bit)."""
        with torch.no_grad():
            for n, p in zip(self.names, self.params, strict=True):
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(clone_state(state["optimizer"]))
        self.synced_for = int(state["synced_for"])
