"""Runs a pipeline of stage processes on loopback around one master, starting replacements."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowcomm.comm import Master
from lowcomm.recovery.pipeline import PipelineConfig
from tests.recovery._stage_peer import TOKEN, dump_path, run_stage


@dataclass
class Outcome:
    """What a run produced: events by kind, exit codes, and the dumps' directory."""

    dump: Path
    events: dict[str, list[tuple[int, dict[str, Any]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    exitcodes: dict[str, int | None] = field(default_factory=dict)
    stopped_seen: bool = False

    def load(self, stage: int | str, what: str) -> dict[str, Any]:
        obj: dict[str, Any] = torch.load(dump_path(str(self.dump), stage, what), weights_only=True)
        return obj

    def of(self, kind: str, stage: int, replica: int | None = None) -> list[dict[str, Any]]:
        """Events of ``kind`` from ``stage`` (of pipeline replica ``replica``, if given)."""
        return [
            info
            for s, info in self.events[kind]
            if s == stage and (replica is None or info.get("replica") == replica)
        ]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def _states(procs: dict[str, Any]) -> dict[str, str]:
    """Each process's exit code, or its /proc state while it runs. With the dumps (written before
    each event), a hang report tells a stage stuck in the pipeline from one that finished but
    whose events never arrived."""
    return {
        name: f"exit {p.exitcode}" if p.exitcode is not None else f"running ({_state(p.pid)})"
        for name, p in procs.items()
    }


def run_pipeline(
    tmp: Path,
    config: PipelineConfig,
    *,
    num_steps: int,
    faults: dict[int, dict[str, Any]],
    heartbeat_timeout_s: float = 3.0,
    timeout_s: float = 100.0,
) -> Outcome:
    """Starts one process per stage (``config.num_replicas`` per stage: ``original<s>`` and
    ``original<s>_<k>``; a fault applies to ``original<s>``), a replacement for each stage whose
    process died (or stopped, after which it is killed once the survivors report aborting), and
    waits for every process's ``done``."""
    master = Master(("127.0.0.1", 0), token=TOKEN, heartbeat_timeout_s=heartbeat_timeout_s).start()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tests.recovery._stage_peer"])
    events: Any = ctx.Queue()
    dump = tmp / "dump"
    dump.mkdir()
    out = Outcome(dump=dump)
    base = {
        "master": "{}:{}".format(*master.address),
        "config": config,
        "store": str(tmp / "store"),
        "dump": str(dump),
        "num_steps": num_steps,
    }
    num_stages = config.stages.num_block_stages + 1
    procs: dict[str, Any] = {}

    def start(stage: int, *, replacement: bool, copy: int = 0) -> None:
        spec = {**base, "stage": stage, "replacement": replacement}
        if not replacement and copy == 0 and stage in faults:
            spec["fault"] = faults[stage]
        name = f"{'replacement' if replacement else 'original'}{stage}"
        name += f"_{copy}" if copy else ""
        procs[name] = ctx.Process(target=run_stage, args=(spec, events), daemon=True)
        procs[name].start()

    try:
        for copy in range(config.num_replicas):
            for s in range(num_stages):
                start(s, replacement=False, copy=copy)
        replaced: set[int] = set()
        done: list[int] = []
        deadline = time.monotonic() + timeout_s
        while len(done) < num_stages * config.num_replicas:
            assert time.monotonic() < deadline, (
                f"timed out; done {sorted(done)}; processes {_states(procs)}; dumps "
                f"{sorted(f.stem for f in dump.iterdir())}; {dict(out.events)}"
            )
            for s in faults:
                victim = procs[f"original{s}"]
                if s in replaced:
                    continue
                if _state(victim.pid) == "T":
                    out.stopped_seen = True
                if not victim.is_alive() or out.stopped_seen:
                    start(s, replacement=True)
                    replaced.add(s)
            try:
                kind, stage, info = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "error":  # drain a moment: another stage's error may say more
                errors = [(stage, info)]
                with contextlib.suppress(queue.Empty):
                    while len(errors) < num_stages:
                        k, s2, i2 = events.get(timeout=2.0)
                        if k == "error":
                            errors.append((s2, i2))
                raise AssertionError("\n".join(f"stage {s} failed:\n{i}" for s, i in errors))
            out.events[kind].append((stage, info))
            if kind == "done":
                done.append(stage)
        for name, p in procs.items():
            victim = name.startswith("original") and name[len("original") :] in map(str, faults)
            if victim and p.is_alive() and _state(p.pid) == "T":  # evicted long ago: gone now
                p.kill()  # (first: a survivor's send to it would wait out its timeout at exit)
        for name, p in procs.items():
            p.join(timeout=20)
            out.exitcodes[name] = p.exitcode
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        master.stop()
    return out
