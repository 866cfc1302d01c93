"""``lowcomm.init()``: one call that turns a torchrun rank into a lowcomm peer of its replica.

    run = lowcomm.init(min_replicas=2)   # torchrun + LOWCOMM_* variables
    model = fully_shard(MyModel().to(run.device))
    trainer = DiLoCo(model, inner, run.comm, config=OuterConfig(...))

Each torchrun job is one *replica*; each of its ranks is one lowcomm peer whose peer group is its
shard index (its rank in the replica), so shard i of every replica all-reduces with shard i of the
others. ``init`` reads explicit arguments first, then ``LOWCOMM_*`` environment variables, then
defaults (``RunConfig.from_env``), plus torchrun's own variables; initialises ``torch.distributed``
for the replica if the script has not (gloo on CPU, nccl on GPU); connects this rank; and returns
once this replica is admitted (all of its ranks at once, never some of them) and at least
``min_replicas`` whole replicas are in the run.

Environment (explicit arguments win; ``RunConfig`` validates every value and names the variable):

    LOWCOMM_MASTER           host:port of the master (required)
    LOWCOMM_TOKEN            the run token; or LOWCOMM_TOKEN_FILE, a file holding it
    LOWCOMM_REPLICA_ID       this replica's id, the same on all of its ranks, unique in the run
                             (default: TORCHELASTIC_RUN_ID, else the replica's MASTER_ADDR:PORT)
    LOWCOMM_MIN_REPLICAS     whole replicas to wait for before training starts (default 1)
    LOWCOMM_JOIN_TIMEOUT_S   how long init() waits for admission and min_replicas (default 600)
    LOWCOMM_TIMEOUT_S        default timeout of every collective (CommConfig.timeout_s, 60)
    LOWCOMM_LISTEN_HOST      interface the peer listener binds (default 0.0.0.0)
    LOWCOMM_ADVERTISE_HOST   address other peers reach this one at (default: this host's
                             address on the route to the master)
    LOWCOMM_DIST_BACKEND     the replica's torch.distributed backend (default nccl / gloo)

From torchrun: RANK and WORLD_SIZE (shard index and number of shards of this replica), LOCAL_RANK
(the GPU), MASTER_ADDR / MASTER_PORT and TORCHELASTIC_RUN_ID (the default replica id), GROUP_RANK
and TORCHELASTIC_RESTART_COUNT (logged). Without torchrun the process is a replica of one rank.

What a script sees when a rank is lost: the master evicts the whole replica (its other ranks get a
``TopologyError`` naming the lost rank from their next lowcomm call, and their heartbeat thread logs
it at once); a rank blocked in an FSDP collective with the dead rank gets the gloo/nccl error from
torch, and torchrun (``--max-restarts``) restarts the replica's ranks, which rejoin as a new unit.
The other replicas' next all-reduce fails, is retried among the survivors, and goes on.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lowcomm.comm import CommConfig, CommTimeoutError, Communicator
from lowcomm.comm.master import parse_address

__all__ = ["ENV", "Run", "RunConfig", "init"]

logger = logging.getLogger(__name__)

# RunConfig field -> the environment variable that fills it.
ENV: dict[str, str] = {
    "master": "LOWCOMM_MASTER",
    "token": "LOWCOMM_TOKEN",
    "replica_id": "LOWCOMM_REPLICA_ID",
    "min_replicas": "LOWCOMM_MIN_REPLICAS",
    "join_timeout_s": "LOWCOMM_JOIN_TIMEOUT_S",
    "timeout_s": "LOWCOMM_TIMEOUT_S",
    "listen_host": "LOWCOMM_LISTEN_HOST",
    "advertise_host": "LOWCOMM_ADVERTISE_HOST",
    "dist_backend": "LOWCOMM_DIST_BACKEND",
    "shard_index": "RANK",
    "num_shards": "WORLD_SIZE",
    "local_rank": "LOCAL_RANK",
}
_TOKEN_FILE = "LOWCOMM_TOKEN_FILE"
_BACKENDS = ("gloo", "nccl")


def _where(name: str) -> str:
    return f"RunConfig.{name} ({ENV[name]})"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where this rank's run is and which part of it the rank is; see the module docstring.

    Build it with ``RunConfig.from_env(...)`` (explicit values > environment > defaults) or
    directly. Validated on construction: a bad value raises ``ValueError`` naming the field and
    the environment variable that sets it.
    """

    master: str
    token: str | None = dataclasses.field(default=None, repr=False)
    replica_id: str = "replica"
    shard_index: int = 0
    num_shards: int = 1
    local_rank: int = 0
    min_replicas: int = 1
    join_timeout_s: float = 600.0
    timeout_s: float = 60.0
    listen_host: str = "0.0.0.0"
    advertise_host: str | None = None
    dist_backend: str | None = None

    def __post_init__(self) -> None:
        try:
            parse_address(self.master)
        except ValueError as e:
            raise ValueError(f"{_where('master')} must be HOST:PORT of the master: {e}") from None
        if not self.replica_id:
            raise ValueError(f"{_where('replica_id')} must be a non-empty string")
        if self.num_shards < 1:
            raise ValueError(f"{_where('num_shards')} must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"{_where('shard_index')} must be in [0, {self.num_shards}), got {self.shard_index}"
            )
        if self.local_rank < 0:
            raise ValueError(f"{_where('local_rank')} must be >= 0, got {self.local_rank}")
        if self.min_replicas < 1:
            raise ValueError(f"{_where('min_replicas')} must be >= 1, got {self.min_replicas}")
        for name in ("join_timeout_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_where(name)} must be > 0, got {getattr(self, name)}")
        if self.dist_backend is not None and self.dist_backend not in _BACKENDS:
            raise ValueError(
                f"{_where('dist_backend')} must be one of {_BACKENDS}, got {self.dist_backend!r}"
            )
        if self.token is not None and not self.token:
            raise ValueError(f"{_where('token')} must not be empty (leave it unset for no token)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **explicit: Any) -> RunConfig:
        """Explicit keyword values (None: not given), then ``env`` (default ``os.environ``), then
        the defaults. ``token_file=`` / ``LOWCOMM_TOKEN_FILE`` name a file holding the token."""
        env = os.environ if env is None else env
        unknown = set(explicit) - {f.name for f in dataclasses.fields(cls)} - {"token_file"}
        if unknown:
            raise TypeError(f"RunConfig has no field(s) {sorted(unknown)}")
        values: dict[str, Any] = {k: v for k, v in explicit.items() if v is not None}
        token_file = values.pop("token_file", None)
        if "token" not in values:
            token = env.get(ENV["token"])
            token_file = token_file or env.get(_TOKEN_FILE)
            if not token and token_file:
                token = _read_token(str(token_file))
            if token:
                values["token"] = token
        for f in dataclasses.fields(cls):
            if f.name in values or f.name == "token" or ENV[f.name] not in env:
                continue
            raw = env[ENV[f.name]]
            kind = type(f.default) if f.default is not dataclasses.MISSING else str
            try:
                values[f.name] = float(raw) if kind is float else int(raw) if kind is int else raw
            except ValueError:
                raise ValueError(
                    f"{_where(f.name)} must be a {kind.__name__}, got {ENV[f.name]}={raw!r}"
                ) from None
        if "master" not in values:
            raise ValueError(
                f"{_where('master')} is not set: pass lowcomm.init(master='HOST:PORT') or set "
                "LOWCOMM_MASTER to the address of a running `lowcomm master`"
            )
        values.setdefault("replica_id", _default_replica_id(env))
        return cls(**values)


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(
            f"{_where('token')}: cannot read the token file {path!r} ({_TOKEN_FILE}): "
            f"{e.strerror}; make one with `lowcomm token new`"
        ) from None
    if not token:
        raise ValueError(f"{_where('token')}: the token file {path!r} ({_TOKEN_FILE}) is empty")
    return token


def _default_replica_id(env: Mapping[str, str]) -> str:
    """torchrun's run id when it has one, else the replica's rendezvous address (unique per
    running torchrun; a loopback one is qualified by the host name)."""
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return run_id
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not (addr and port):
        return f"{socket.gethostname()}:{os.getpid()}"  # a replica of one process
    try:
        loopback = ipaddress.ip_address(addr).is_loopback
    except ValueError:
        loopback = addr == "localhost"
    return f"{socket.gethostname()}/{addr}:{port}" if loopback else f"{addr}:{port}"


def _route_to(master: str) -> str:
    """This host's address on the route to ``master`` (no packet is sent)."""
    host, port = parse_address(master)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port or 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


@dataclass
class Run:
    """This rank's place in the run, as ``init()`` returns it.

    Attributes:
        comm: the connected ``Communicator`` (peer group = ``shard_index``), for ``DiLoCo``.
        config: the ``RunConfig`` it was built from.
        replica_id, shard_index, num_shards: this replica and this rank's shard of it.
        min_replicas: the whole replicas ``init()`` waited for.
        device: the rank's device (``cuda:LOCAL_RANK`` with CUDA, else CPU).
    """

    comm: Communicator
    config: RunConfig
    device: torch.device
    owns_process_group: bool = False

    @property
    def replica_id(self) -> str:
        return self.config.replica_id

    @property
    def shard_index(self) -> int:
        return self.config.shard_index

    @property
    def num_shards(self) -> int:
        return self.config.num_shards

    @property
    def min_replicas(self) -> int:
        return self.config.min_replicas

    @property
    def num_replicas(self) -> int:
        """Whole replicas in the run, as of this peer's last phase."""
        return len(self.comm.replicas)

    def close(self) -> None:
        """Leaves the run (the master evicts this replica as a whole) and, if ``init()`` created
        it, destroys the replica's process group. Every rank calls it at the end. Idempotent."""
        self.comm.close()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def init(
    master: str | None = None,
    *,
    token: str | None = None,
    replica_id: str | None = None,
    min_replicas: int | None = None,
    join_timeout_s: float | None = None,
    comm_config: CommConfig | None = None,
    env: Mapping[str, str] | None = None,
) -> Run:
    """Connects this torchrun rank to the run; returns once its replica is admitted as a whole and
    at least ``min_replicas`` whole replicas are in. Every rank of every replica calls it once,
    before the model's first forward pass (FSDP's collectives must not start before the replica
    is in, or they would block against a rank still waiting for admission).

    Args:
        master, token, replica_id, min_replicas, join_timeout_s: override ``LOWCOMM_*`` (see the
            module docstring); other settings come from the environment only.
        comm_config: the communicator's other settings (connections, shaper, faults); its
            ``timeout_s``, ``listen_host`` and ``advertise_host`` are replaced by ``RunConfig``'s
            (``advertise_host`` only where ``RunConfig`` leaves it unset).
        env: the environment to read (default ``os.environ``), for tests.

    Raises:
        ValueError: a bad or missing setting (the message names the variable).
        CommTimeoutError: not admitted, or fewer than ``min_replicas`` replicas, within
            ``join_timeout_s``; the message names the replicas and ranks that are missing.
        AuthenticationError, PeerFailureError: wrong token; master unreachable.
    """
    env = os.environ if env is None else env
    config = RunConfig.from_env(
        env,
        master=master,
        token=token,
        replica_id=replica_id,
        min_replicas=min_replicas,
        join_timeout_s=join_timeout_s,
    )
    device, owns = _init_process_group(config, env)
    base = comm_config or CommConfig()
    comm = Communicator(
        config.master,
        peer_group=config.shard_index,
        token=config.token,
        config=dataclasses.replace(
            base,
            timeout_s=config.timeout_s,
            listen_host=config.listen_host,
            advertise_host=config.advertise_host or base.advertise_host or _advertise(config),
        ),
        replica_id=config.replica_id,
        replica_rank=config.shard_index,
        num_replica_ranks=config.num_shards,
    )
    run = Run(comm=comm, config=config, device=device, owns_process_group=owns)
    try:
        deadline = time.monotonic() + config.join_timeout_s
        comm.connect(timeout_s=config.join_timeout_s)
        _wait_for_replicas(comm, config, deadline)
    except BaseException:
        run.close()
        raise
    logger.info(
        "replica %r shard %d/%d joined: %d replicas in the run (restart %s, node %s)",
        config.replica_id,
        config.shard_index,
        config.num_shards,
        run.num_replicas,
        env.get("TORCHELASTIC_RESTART_COUNT", "0"),
        env.get("GROUP_RANK", "0"),
    )
    return run


def _advertise(config: RunConfig) -> str | None:
    if config.listen_host not in ("0.0.0.0", ""):
        return None  # CommConfig advertises the interface it binds
    return _route_to(config.master)


def _init_process_group(config: RunConfig, env: Mapping[str, str]) -> tuple[torch.device, bool]:
    """The replica's own process group (FSDP's), unless the script made it already."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", config.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != config.num_shards or dist.get_rank() != config.shard_index:
            raise ValueError(
                f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, but "
                f"{_where('shard_index')} / {_where('num_shards')} say {config.shard_index} of "
                f"{config.num_shards}: each replica's process group must be its torchrun job"
            )
        return device, False
    backend = config.dist_backend or ("nccl" if cuda else "gloo")
    timeout = datetime.timedelta(seconds=max(config.join_timeout_s, 600.0))
    if config.num_shards == 1 and "MASTER_ADDR" not in env:
        # A replica of one process without torchrun: a private in-memory store.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    else:
        dist.init_process_group(backend, timeout=timeout)
    return device, True


def _wait_for_replicas(comm: Communicator, config: RunConfig, deadline: float) -> None:
    """Admits replicas at ``update_topology()`` until ``min_replicas`` whole ones are in. Every
    accepted rank of every replica runs this loop, so they all call the same phases."""
    while len(comm.replicas) < config.min_replicas:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CommTimeoutError(_missing(comm, config))
        comm.update_topology(timeout_s=remaining)
        if len(comm.replicas) < config.min_replicas and not comm.pending_replicas:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _missing(comm: Communicator, config: RunConfig) -> str:
    accepted = comm.replicas
    pending = comm.pending_replicas
    parts = [
        f"only {len(accepted)} of min_replicas={config.min_replicas} replicas joined within "
        f"{config.join_timeout_s:g} s ({ENV['min_replicas']}, LOWCOMM_JOIN_TIMEOUT_S)",
        "accepted: "
        + (", ".join(f"{r!r} ({len(k)} ranks)" for r, k in accepted.items()) or "none"),
    ]
    for replica, info in pending.items():
        missing = sorted(set(range(int(info["num_ranks"]))) - set(info["ranks"]))
        parts.append(
            f"pending: {replica!r} has ranks {info['ranks']} of {info['num_ranks']} "
            f"(missing ranks {missing}: not started, or stuck before lowcomm.init())"
        )
    if not pending:
        parts.append("no other replica has registered with the master")
    return "; ".join(parts)
