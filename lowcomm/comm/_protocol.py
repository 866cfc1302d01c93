"""The control-plane protocol: frame kinds, master operations and their typed, validated requests.

Every message between a peer and the master is a JSON object in a ``KIND_REQUEST`` frame, answered
by one in a ``KIND_RESPONSE`` frame. A request names its operation in ``"op"`` (one of ``Op``); the
master turns it into the operation's request dataclass with ``parse_request``, which checks every
field's type and range and raises ``ProtocolError`` naming the field. Peers build requests from the
same dataclasses (``to_wire()``), so both halves agree on the schema by construction.

An answer that carries ``"error"`` holds one of ``ErrorCode``; ``error_for`` maps it to the
exception class the caller raises. The point-to-point and shared-state frame kinds live here too,
so every kind of the control and side channels is defined in one place.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowcomm.comm.errors import (
    AuthenticationError,
    CommError,
    NonFiniteError,
    PeerFailureError,
    ProtocolError,
    StaleStateError,
    TopologyError,
)

__all__ = [
    "KIND_P2P_ACK",
    "KIND_P2P_DATA",
    "KIND_P2P_HEADER",
    "KIND_REQUEST",
    "KIND_RESPONSE",
    "KIND_STATE_DATA",
    "KIND_STATE_REQUEST",
    "MAX_CONTROL_FRAME_BYTES",
    "ErrorCode",
    "GateKind",
    "GateRequest",
    "HeartbeatRequest",
    "LeaveGateRequest",
    "LeaveRequest",
    "Op",
    "OpReport",
    "OpState",
    "RegisterRequest",
    "Request",
    "StatusRequest",
    "SyncDoneRequest",
    "VerdictRequest",
    "VoteRequest",
    "WorldEntry",
    "describe_gate",
    "error_for",
    "forbidden",
    "parse_address",
    "parse_request",
    "parse_secret",
    "refuse_all_reduce",
    "to_wire",
]

logger = logging.getLogger(__name__)

# Frame kinds of the control protocol (requests and responses are JSON objects).
KIND_REQUEST = 0x40
KIND_RESPONSE = 0x41
# Point-to-point send/recv: a JSON header, data frames, a JSON ack.
KIND_P2P_HEADER = 0x48
KIND_P2P_DATA = 0x49
KIND_P2P_ACK = 0x4A
# Shared-state transfer: a JSON chunk request, answered by one data frame.
KIND_STATE_REQUEST = 0x50
KIND_STATE_DATA = 0x51

# Control messages are small; anything larger is garbage and closes the connection.
MAX_CONTROL_FRAME_BYTES = 16 * 1024 * 1024


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"`` or ``(host, port)`` -> ``(host, port)``; ValueError naming the problem."""
    if isinstance(address, tuple):
        host, port = address
    else:
        host, sep, port_s = str(address).rpartition(":")
        if not sep or not host:
            raise ValueError(f"address must be HOST:PORT, got {address!r}")
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"address port must be an integer, got {address!r}") from None
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"address port must be in [0, 65535], got {port}")
    return str(host), int(port)


class Op(enum.StrEnum):
    """The master's operations; the value is what travels in a request's ``"op"`` field."""

    REGISTER = "register"  # session connection: join (or re-join after a master restart)
    HEARTBEAT = "heartbeat"  # session connection: I am alive
    STATUS = "status"  # wait (bounded) until this peer is accepted
    GATE = "gate"  # arrive at a phase gate; answered once it opens (or "waiting")
    LEAVE_GATE = "leave_gate"  # give up waiting at a gate (the caller timed out)
    VOTE = "vote"  # ok/fail on an all-reduce; answered with the verdict once known
    VERDICT = "verdict"  # ask an all-reduce's verdict without voting (abort a running ring early)
    SYNC_DONE = "sync_done"  # a shared-state sync participant finished
    LEAVE = "leave"  # close(): remove this peer now


class GateKind(enum.StrEnum):
    """The phases a gate can stand for. World-scoped ones wait for every accepted peer; group-
    scoped ones for every accepted peer of the caller's peer group."""

    TOPOLOGY = "topology"
    PENDING = "pending"
    ALL_REDUCE = "all_reduce"
    SYNC = "sync"
    VOTE = "vote"  # a world-wide ok/fail vote (a pipeline's step commit); key names the step

    @property
    def world_scoped(self) -> bool:
        return self in (GateKind.TOPOLOGY, GateKind.PENDING, GateKind.VOTE)


def describe_gate(kind: str, key: str) -> str:
    """The public call a gate stands for, for error messages (``all_reduce(tag=3)``)."""
    calls: dict[str, str] = {
        GateKind.TOPOLOGY: "update_topology()",
        GateKind.PENDING: "are_peers_pending()",
        GateKind.ALL_REDUCE: f"all_reduce(tag={key})",
        GateKind.SYNC: "sync_shared_state()",
        GateKind.VOTE: f"vote({key!r})",
    }
    return calls.get(kind, kind)


class ErrorCode(enum.StrEnum):
    """The ``"error"`` values the master answers with."""

    EVICTED = "evicted"  # this peer was removed (dead, silent, left): it must rejoin anew
    UNKNOWN_PEER = "unknown_peer"  # the master restarted and does not know this peer yet
    NOT_ACCEPTED = "not_accepted"  # a phase before connect() returned
    LOCKSTEP = "lockstep"  # two peers are in different phases
    MISMATCH = "mismatch"  # the peers of an all-reduce describe different operations
    SYNC = "sync"  # the shared-state election found no state to agree on
    STALE = "stale"  # the peers of an all-reduce are at different stamps (outer step, revision)
    NONFINITE = "nonfinite"  # a participant's contribution holds NaN or inf
    FORBIDDEN = "forbidden"  # the request acts for a peer this connection cannot speak for


_ERROR_CLASSES: dict[str, type[CommError]] = {
    # The peers are out of lockstep or this peer is not (or no longer) in the world: every one
    # of these is fixed by update_topology() / rejoining, which TopologyError tells the caller.
    ErrorCode.EVICTED: TopologyError,
    ErrorCode.NOT_ACCEPTED: TopologyError,
    ErrorCode.LOCKSTEP: TopologyError,
    ErrorCode.MISMATCH: TopologyError,
    ErrorCode.SYNC: TopologyError,
    ErrorCode.STALE: StaleStateError,
    # A poisoned contribution: retrying would only poison it again; the caller drops the round.
    ErrorCode.NONFINITE: NonFiniteError,
    # Another peer's identity (or a stale secret): a bug or an attack, never retried.
    ErrorCode.FORBIDDEN: AuthenticationError,
    # The master lost this peer (it restarted); the session re-registers, the call may be retried.
    ErrorCode.UNKNOWN_PEER: PeerFailureError,
}


def forbidden(peer_id: str, what: str) -> dict[str, Any]:
    """The master's answer to a request that acts for a peer without that peer's secret."""
    logger.warning("master: refused a request to %s for peer %s without its secret", what, peer_id)
    return {
        "error": ErrorCode.FORBIDDEN,
        "message": f"this connection may not {what} for peer {peer_id}: a peer acts only for "
        "itself, with the secret it registered with",
    }


def refuse_all_reduce(arrivals: dict[str, tuple[dict[str, Any], bool]]) -> dict[str, Any] | None:
    """The master's answer to every participant of an all-reduce whose gate is complete, when
    it must not run: ``arrivals`` maps each peer to its payload (op, size, dtype, the codec's
    whole description) and whether its contribution holds NaN/inf. None: it may run."""
    (first_pid, (first, _)), *_rest = arrivals.items()
    for pid, (payload, _nonfinite) in arrivals.items():
        if payload != first:
            fields = sorted(k for k in {*first, *payload} if first.get(k) != payload.get(k))
            diff = "; ".join(
                f"{k}: {first_pid} has {first.get(k)!r}, {pid} has {payload.get(k)!r}"
                for k in fields
            )
            return {
                "error": ErrorCode.MISMATCH,
                "message": f"peers disagree on the all_reduce arguments ({diff}); pass the same",
            }
    poisoned = sorted(pid for pid, (_payload, nonfinite) in arrivals.items() if nonfinite)
    if poisoned:
        return {
            "error": ErrorCode.NONFINITE,
            "message": f"the contribution of peer(s) {', '.join(poisoned)} holds NaN or inf: "
            "nothing was reduced or applied on any peer",
        }
    return None


def error_for(code: str, message: str, answer: dict[str, Any] | None = None) -> CommError:
    """The exception for a master answer's ``"error"`` code; an unknown code is a protocol error
    (a master of another version). ``answer``: the whole answer, for errors that carry details
    (``StaleStateError``'s ``stamps``)."""
    cls = _ERROR_CLASSES.get(code)
    if cls is None:
        return ProtocolError(f"{message} (the master answered an unknown error code {code!r})")
    if cls is StaleStateError:
        stamps = (answer or {}).get("stamps")
        mine = (answer or {}).get("peer_id")
        return StaleStateError(
            message,
            stamps=stamps if isinstance(stamps, dict) else {},
            mine=mine if isinstance(mine, str) else None,
        )
    return cls(message)


# ---------------------------------------------------------------------------- request schema
# Bounds on every field: a hostile or broken peer gets a ProtocolError naming the field, never an
# OverflowError, a MemoryError or a giant log line from somewhere deeper in the master.
_MAX_INT = 2**53  # exact in a JSON double; far above any group, revision or sequence number
_MAX_STR = 256  # peer ids, rids, tags, hosts, op ids, secrets
_MAX_WAIT_S = 3600.0
_MAX_LIST = 4096  # world entries, participants
_MAX_PAYLOAD_CHARS = 1 << 20  # a gate's payload (a sync's hashes of many tensors)


def _show(value: Any) -> str:
    """A bounded rendering of a rejected value for the error message (never the whole thing)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({type(value).__name__})"


def _str(obj: dict[str, Any], name: str, default: str | None = None) -> str:
    value = obj.get(name, default)
    if not isinstance(value, str) or len(value) > _MAX_STR:
        raise ProtocolError(
            f"request field {name!r} must be a string of at most {_MAX_STR} characters, "
            f"got {_show(value)}"
        )
    return value


def _int(obj: dict[str, Any], name: str, default: int | None = None, *, low: int = 0) -> int:
    value = obj.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= _MAX_INT:
        raise ProtocolError(
            f"request field {name!r} must be an integer in [{low}, 2**53], got {_show(value)}"
        )
    return value


def _bool(obj: dict[str, Any], name: str, default: bool | None = None) -> bool:
    value = obj.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"request field {name!r} must be a boolean, got {_show(value)}")
    return value


def _wait(obj: dict[str, Any]) -> float:
    value = obj.get("wait_s", 0.0)
    # ``not 0 <= value <= max`` is also true for NaN.
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value <= _MAX_WAIT_S
    ):
        raise ProtocolError(
            f"request field 'wait_s' must be a number in [0, {_MAX_WAIT_S:g}], got {_show(value)}"
        )
    return float(value)


def _str_list(obj: dict[str, Any], name: str) -> list[str]:
    value = obj.get(name, [])
    if (
        not isinstance(value, list)
        or len(value) > _MAX_LIST
        or not all(isinstance(v, str) and len(v) <= _MAX_STR for v in value)
    ):
        raise ProtocolError(
            f"request field {name!r} must be a list of at most {_MAX_LIST} strings, "
            f"got {_show(value)}"
        )
    return list(value)


def _address(value: Any, name: str) -> tuple[str, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not isinstance(value[0], str)
        or len(value[0]) > _MAX_STR
        or not isinstance(value[1], int)
        or isinstance(value[1], bool)
        or not 0 <= value[1] <= 65535
    ):
        raise ProtocolError(f"request field {name!r} must be [host, port], got {_show(value)}")
    return value[0], value[1]


def parse_secret(obj: dict[str, Any]) -> str:
    """The per-peer secret a request carries next to its fields (``""``: none; see
    ``Membership.authorize``). ``ProtocolError`` if it is not a short string."""
    return _str(obj, "secret", "")


class OpState(enum.StrEnum):
    """Where a peer stands in its latest all-reduce, as it tells a restarted master."""

    RUNNING = "running"  # the gate opened; its ring has not finished (it has not voted)
    HOLDING = "holding"  # it voted ok and holds the finished result, waiting for the verdict
    FAILED = "failed"  # it voted fail (its ring broke): no commit is possible
    COMMITTED = "committed"  # it received "commit" and applied the result
    ABORTED = "aborted"  # it received "abort"


@dataclass(frozen=True, kw_only=True)
class OpReport:
    """A peer's latest all-reduce: what a restarted master resolves it from (see ``_rounds``)."""

    op_id: str
    group: int
    participants: list[str]
    state: OpState

    def to_wire(self) -> dict[str, Any]:
        return {
            "op_id": self.op_id,
            "group": self.group,
            "participants": list(self.participants),
            "state": str(self.state),
        }

    @classmethod
    def parse(cls, obj: Any) -> OpReport | None:
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise ProtocolError(f"request field 'last_op' must be an object, got {_show(obj)}")
        state = _str(obj, "state")
        if state not in OpState.__members__.values():
            raise ProtocolError(
                f"request field 'last_op.state' must be one of {[str(s) for s in OpState]}, "
                f"got {_show(state)}"
            )
        return cls(
            op_id=_str(obj, "op_id"),
            group=_int(obj, "group"),
            participants=_str_list(obj, "participants"),
            state=OpState(state),
        )


@dataclass(frozen=True, kw_only=True)
class WorldEntry:
    """One accepted peer as a re-registering peer remembers it."""

    peer_id: str
    peer_group: int
    address: tuple[str, int]
    join_seq: int = -1
    replica_id: str = ""
    replica_rank: int = 0
    num_replica_ranks: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "peer_group": self.peer_group,
            "address": list(self.address),
            "join_seq": self.join_seq,
            "replica_id": self.replica_id,
            "replica_rank": self.replica_rank,
            "num_replica_ranks": self.num_replica_ranks,
        }


@dataclass(frozen=True, kw_only=True)
class RegisterRequest:
    """Join the run. ``rejoin``: re-registering after a master restart; ``accepted``: an earlier
    master had accepted this peer (it then comes back accepted, with the ``world`` it knew).

    ``replica_id`` / ``replica_rank`` / ``num_replica_ranks``: this peer is rank ``replica_rank``
    of the ``num_replica_ranks`` ranks of replica ``replica_id`` (a torchrun job), which the master
    admits and evicts as one unit. ``num_replica_ranks=0``: a peer on its own."""

    OP = Op.REGISTER
    peer_id: str
    peer_group: int
    address: tuple[str, int]
    accepted: bool = False
    rejoin: bool = False
    revision: int = 0
    join_seq: int = -1
    world: list[WorldEntry] = field(default_factory=list)
    replica_id: str = ""
    replica_rank: int = 0
    num_replica_ranks: int = 0
    last_op: OpReport | None = None

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> RegisterRequest:
        world = obj.get("world", [])
        if (
            not isinstance(world, list)
            or len(world) > _MAX_LIST
            or not all(isinstance(e, dict) for e in world)
        ):
            raise ProtocolError(
                f"request field 'world' must be a list of objects, got {_show(world)}"
            )
        return cls(
            peer_id=_str(obj, "peer_id", ""),
            peer_group=_int(obj, "peer_group"),
            address=_address(obj.get("address"), "address"),
            accepted=_bool(obj, "accepted", False),
            rejoin=_bool(obj, "rejoin", False),
            revision=_int(obj, "revision", 0),
            join_seq=_int(obj, "join_seq", -1, low=-1),
            world=[
                WorldEntry(
                    peer_id=_str(e, "peer_id"),
                    peer_group=_int(e, "peer_group"),
                    address=_address(e.get("address"), "world[].address"),
                    join_seq=_int(e, "join_seq", -1, low=-1),
                    **_replica_fields(e),
                )
                for e in world
            ],
            **_replica_fields(obj),
            last_op=OpReport.parse(obj.get("last_op")),
        )


def _replica_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The replica-unit fields of a registration or world entry, validated together."""
    size = _int(obj, "num_replica_ranks", 0)
    rank = _int(obj, "replica_rank", 0)
    replica = _str(obj, "replica_id", "")
    if size and (not replica or rank >= size):
        raise ProtocolError(
            f"request fields 'replica_id' ({replica!r}) and 'replica_rank' ({rank}) must name a "
            f"rank in [0, {size}) of a non-empty replica id when 'num_replica_ranks' is {size}"
        )
    return {"replica_id": replica, "replica_rank": rank, "num_replica_ranks": size}


@dataclass(frozen=True, kw_only=True)
class HeartbeatRequest:
    OP = Op.HEARTBEAT
    peer_id: str

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> HeartbeatRequest:
        return cls(peer_id=_str(obj, "peer_id"))


@dataclass(frozen=True, kw_only=True)
class StatusRequest:
    OP = Op.STATUS
    peer_id: str
    wait_s: float = 0.0

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> StatusRequest:
        return cls(peer_id=_str(obj, "peer_id"), wait_s=_wait(obj))


@dataclass(frozen=True, kw_only=True)
class GateRequest:
    """Arrive at the gate ``kind``/``key`` (``key``: the all-reduce tag). ``rid`` identifies this
    arrival across the polls that repeat it; ``payload`` describes the operation (all peers of an
    all-reduce must send the same one; a sync sends its state's hashes)."""

    OP = Op.GATE
    peer_id: str
    kind: GateKind
    rid: str
    key: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    nonfinite: bool = False  # all_reduce: this peer's contribution holds NaN or inf
    wait_s: float = 0.0

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> GateRequest:
        kind = _str(obj, "kind")
        if kind not in GateKind.__members__.values():
            raise ProtocolError(
                f"request field 'kind' must be one of {[str(k) for k in GateKind]}, "
                f"got {_show(kind)}"
            )
        payload = obj.get("payload") or {}
        if not isinstance(payload, dict):
            raise ProtocolError(f"request field 'payload' must be an object, got {_show(payload)}")
        if len(repr(payload)) > _MAX_PAYLOAD_CHARS:
            raise ProtocolError(
                f"request field 'payload' must stay under {_MAX_PAYLOAD_CHARS} characters"
            )
        return cls(
            peer_id=_str(obj, "peer_id"),
            kind=GateKind(kind),
            rid=_str(obj, "rid"),
            key=_str(obj, "key", ""),
            payload=dict(payload),
            nonfinite=_bool(obj, "nonfinite", False),
            wait_s=_wait(obj),
        )


@dataclass(frozen=True, kw_only=True)
class LeaveGateRequest:
    OP = Op.LEAVE_GATE
    peer_id: str
    rid: str

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> LeaveGateRequest:
        return cls(peer_id=_str(obj, "peer_id"), rid=_str(obj, "rid"))


@dataclass(frozen=True, kw_only=True)
class VoteRequest:
    """An all-reduce's vote. ``participants`` and ``group`` (from the gate's answer) let a master
    that restarted mid-operation adopt an operation it never saw and resolve it (``_rounds``)."""

    OP = Op.VOTE
    peer_id: str
    op_id: str
    ok: bool
    group: int = 0
    participants: list[str] = field(default_factory=list)
    wait_s: float = 0.0

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> VoteRequest:
        return cls(
            peer_id=_str(obj, "peer_id"),
            op_id=_str(obj, "op_id"),
            ok=_bool(obj, "ok"),
            group=_int(obj, "group", 0),
            participants=_str_list(obj, "participants"),
            wait_s=_wait(obj),
        )


@dataclass(frozen=True, kw_only=True)
class VerdictRequest:
    OP = Op.VERDICT
    peer_id: str
    op_id: str
    wait_s: float = 0.0

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> VerdictRequest:
        return cls(peer_id=_str(obj, "peer_id"), op_id=_str(obj, "op_id"), wait_s=_wait(obj))


@dataclass(frozen=True, kw_only=True)
class SyncDoneRequest:
    OP = Op.SYNC_DONE
    peer_id: str
    op_id: str
    ok: bool
    wait_s: float = 0.0

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> SyncDoneRequest:
        return cls(
            peer_id=_str(obj, "peer_id"),
            op_id=_str(obj, "op_id"),
            ok=_bool(obj, "ok"),
            wait_s=_wait(obj),
        )


@dataclass(frozen=True, kw_only=True)
class LeaveRequest:
    OP = Op.LEAVE
    peer_id: str

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> LeaveRequest:
        return cls(peer_id=_str(obj, "peer_id"))


Request = (
    RegisterRequest
    | HeartbeatRequest
    | StatusRequest
    | GateRequest
    | LeaveGateRequest
    | VoteRequest
    | VerdictRequest
    | SyncDoneRequest
    | LeaveRequest
)

_PARSERS: dict[Op, Callable[[dict[str, Any]], Request]] = {
    Op.REGISTER: RegisterRequest.parse,
    Op.HEARTBEAT: HeartbeatRequest.parse,
    Op.STATUS: StatusRequest.parse,
    Op.GATE: GateRequest.parse,
    Op.LEAVE_GATE: LeaveGateRequest.parse,
    Op.VOTE: VoteRequest.parse,
    Op.VERDICT: VerdictRequest.parse,
    Op.SYNC_DONE: SyncDoneRequest.parse,
    Op.LEAVE: LeaveRequest.parse,
}


def parse_request(obj: Any) -> Request:
    """A request frame's JSON -> its operation's request; ``ProtocolError`` naming the bad field."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"a request must be a JSON object, got {type(obj).__name__}")
    op = obj.get("op")
    if op not in Op.__members__.values():
        raise ProtocolError(
            f"request field 'op' must be one of {[str(o) for o in Op]}, got {_show(op)}"
        )
    return _PARSERS[Op(str(op))](obj)


def to_wire(request: Request) -> dict[str, Any]:
    """The JSON object a request travels as (``"op"`` plus every field)."""
    out: dict[str, Any] = {"op": str(request.OP)}
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if f.name == "world":
            value = [e.to_wire() for e in value]
        elif isinstance(value, OpReport):
            value = value.to_wire()
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, enum.Enum):
            value = str(value)
        out[f.name] = value
    return out
