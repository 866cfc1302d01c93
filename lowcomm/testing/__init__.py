"""Fault-test a training script the way lowcomm's own tests do: arm a fault, run, assert it fired.

What is here:
    ``FaultInjector``   the one fault mechanism. Every component with fault points takes
                        ``faults=`` (``CommConfig``, ``Master``, ``Checkpointer``, ``DiLoCo``); a
                        rule armed on a named point kills, stops, delays, raises or corrupts
                        there, optionally only when the point's context matches (``where=``).
    ``POINTS``          every point's name, where it fires and the context it passes.
    ``KILLED_EXIT_CODE`` the exit status of a process a ``kill=True`` rule ended.
    ``Shaper``          a WAN on loopback: token-bucket bandwidth plus one-way latency on
                        lowcomm's own sockets (``CommConfig(shaper=...)``).
    ``LocalGroup``, ``SoloCommunicator``  in-process communicators: n replicas in threads of one
                        process, or a world of one, for fast seeded runs of the outer loop.

The recipe, in three steps:

1. Arm a point. An injector lives in one process; arm it in the process that should misbehave::

    from lowcomm.testing import FaultInjector

    faults = FaultInjector()
    faults.inject("trainer.inner_step", kill=True, where={"step": 30})  # die after inner step 30
    faults.inject("ring.send", stop=True, where={"step": 1, "sub": 1})  # freeze mid all-reduce
    faults.inject("local.write", error=OSError(errno.ENOSPC, "No space left on device"))

2. Run the code under test with the injector handed to the component that owns the point::

    trainer = DiLoCo(model, inner_opt, comm, config=outer, faults=faults)
    comm = Communicator(address, token=token, config=CommConfig(faults=faults, shaper=shaper))
    checkpointer = Checkpointer(checkpoint_config, faults=faults)

3. Assert that the fault really fired, then what the survivors did, so the test cannot pass
   vacuously. In the faulty process, ``faults.fired("local.write") == 1`` (``hits(point)``
   counts every time the point was reached, armed or not). A killed peer cannot report, so its
   parent checks ``proc.exitcode == KILLED_EXIT_CODE`` instead. Then check the outcome: the
   survivors' outer parameters agree bit for bit, the round was retried or dropped, the
   checkpoint without its manifest does not load.

A multi-peer test spawns each peer as a process on loopback (world size <= 4, with timeouts) and
arms faults inside the peer's own entry point, since an injector does not cross processes; a
slow link is ``Shaper(bandwidth_bps=100e6, latency_ms=20)`` given to each peer. A convergence or
bit-reproducibility test needs no sockets at all: run ``LocalGroup(n)``'s communicators in ``n``
threads (``lowcomm.launch.experiments.simulate`` does exactly that).
"""

from __future__ import annotations

from lowcomm.comm.shaper import Shaper
from lowcomm.faults import KILLED_EXIT_CODE, POINTS, FaultInjector
from lowcomm.testing.groups import LocalGroup, SoloCommunicator

__all__ = [
    "KILLED_EXIT_CODE",
    "POINTS",
    "FaultInjector",
    "LocalGroup",
    "Shaper",
    "SoloCommunicator",
]
