"""Checkpointing: lowcomm's lazy multi-level Checkpointer against torch.save and DCP async_save.

One process trains one model + AdamW state (about 1.2 GB: 100M fp32 parameters and two moments)
and checkpoints it with each method in turn, cycle by cycle (the order rotates), so every ratio is
taken in the same run under the same load. One uncounted warm-up checkpoint per method first; each
method keeps one checkpoint on disk (lowcomm: keep_last_local=1, so from its second checkpoint on
it rewrites the data file of the one it deletes; its first ones write fresh files and are slower).
Per method:

- blocking: time the training thread spends in checkpointing per checkpoint: the save call plus,
  for the asynchronous methods, the wait right before ``optimizer.step()`` (DCP:
  ``staging_completion.result()`` as torchtitan does; lowcomm: ``wait_until_safe_to_mutate``);
- next step: how much longer the step after the save takes than a step without checkpointing;
- durable: from the save call until the checkpoint is fsynced on local disk and committed;
- bytes on disk, and restore: reading the newest checkpoint back into the model and optimizer
  (files were just written, so reads hit the page cache equally for all methods); every restore
  is checked bit for bit against the state at the checkpoint.

    .venv/bin/python benchmarks/checkpoint.py            # 1.2 GB of state, 5 checkpoints each
    .venv/bin/python benchmarks/checkpoint.py --quick    # 0.15 GB, 3 checkpoints, same code paths
    .venv/bin/python benchmarks/checkpoint.py --device cuda --params 700e6 --every-step
                                                         # GPU: >= 8 GB, checkpoint every step

Last line: one JSON object with the claims (see issue 5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lowcomm.checkpoint import CheckpointConfig, Checkpointer
from lowcomm.checkpoint.local_level import LocalLevel

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def build(params: float, width: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    depth = max(1, round(params / (width * width)))
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width, bias=False), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def clone_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone_state(v) for v in state]
    return state


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


def dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class TorchSave:
    name = "torch.save"

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = ""

    def save(self, step: int, state: dict[str, Any]) -> None:
        previous = self.path
        self.path = os.path.join(self.root, f"step_{step}.pt")
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # durable, like the others
        os.replace(tmp, self.path)
        self.durable_at = time.perf_counter()
        if previous:  # keep one, like the others keep a bounded number
            os.remove(previous)

    def barrier(self) -> None:
        pass

    def durable(self) -> float | None:
        return self.durable_at

    def last_bytes(self) -> int:
        return os.path.getsize(self.path)

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    def close(self) -> None:
        pass


class DcpAsync:
    name = "DCP async_save+DefaultStager"

    def __init__(self, root: str, device: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.dcp = dcp
        self.root = root
        cuda = device == "cuda"
        self.options = StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=True,
            use_non_blocking_copy=cuda,
        )
        self.stager = DefaultStager(self.options)
        self.response: Any = None
        self.durable_at: float | None = None
        self.path = ""

    def save(self, step: int, state: dict[str, Any]) -> None:
        if self.response is not None:  # torchtitan: one save in flight
            self.response.upload_completion.result()
            shutil.rmtree(self.path)  # keep a bounded number, like the others
        self.path = os.path.join(self.root, f"step_{step}")
        self.durable_at = None
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.response = self.dcp.async_save(
            state,
            checkpoint_id=self.path,
            async_checkpointer_type=AsyncCheckpointerType.THREAD,
            async_stager=self.stager,
        )

        def done(_: Any) -> None:
            self.durable_at = time.perf_counter()

        self.response.upload_completion.add_done_callback(done)

    def barrier(self) -> None:
        if self.response is not None:
            self.response.staging_completion.result()

    def durable(self) -> float | None:
        return self.durable_at

    def last_bytes(self) -> int:
        return dir_bytes(self.path)

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        state = state_of(model, opt)
        self.dcp.load(state, checkpoint_id=self.path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    def close(self) -> None:
        if self.response is not None:
            self.response.upload_completion.result()
        self.stager.close()


class Lowcomm:
    name = "lowcomm Checkpointer"

    def __init__(self, root: str, compression: str) -> None:
        self.ck = Checkpointer(
            CheckpointConfig(levels=("host://", root), compression=compression, keep_last_local=1)
        )
        self.handle: Any = None

    def save(self, step: int, state: dict[str, Any]) -> None:
        self.handle = self.ck.save(step, state)

    def barrier(self) -> None:
        self.ck.wait_until_safe_to_mutate()

    def durable(self) -> float | None:
        if self.handle is None or not self.handle.done("local"):
            return None
        self.handle.wait("local", timeout_s=1)  # raises if the write failed
        # committed_at is time.monotonic(); convert to the perf_counter clock used here.
        return float(self.handle.committed_at["local"] - time.monotonic() + time.perf_counter())

    def last_bytes(self) -> int:
        local = self.ck.level("local")
        assert isinstance(local, LocalLevel)
        return dir_bytes(local.step_dir(self.handle.step))

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        state = self.ck.restore(levels=["local"], into=state_of(model, opt))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    def close(self) -> None:
        self.ck.close()


def run_all(
    makers: dict[str, Callable[[str], Any]], args: argparse.Namespace, base: str
) -> dict[str, Any]:
    """Every method checkpoints the same model, interleaved cycle by cycle (the order rotates),
    so a change in machine load hits all of them alike."""
    model, opt = build(args.params, args.width, args.device)
    x = torch.randn(args.batch, args.width, device=args.device)
    methods = {
        name: make(os.path.join(base, name.replace(".", "_"))) for name, make in makers.items()
    }
    for name in methods:
        os.makedirs(os.path.join(base, name.replace(".", "_")), exist_ok=True)
    current: list[Any] = [None]

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        sync(args.device)
        tb = time.perf_counter()
        if current[0] is not None:
            current[0].barrier()  # right before optimizer.step()
        block = time.perf_counter() - tb
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        return time.perf_counter() - t0, block

    for _ in range(2):  # creates the AdamW moments
        step()
    base_steps: list[float] = []
    res: dict[str, dict[str, list[float]]] = {
        n: {"blocking": [], "barrier": [], "next": [], "durable": []} for n in methods
    }
    names = list(methods)
    save_id = 0
    # Cycle -1 warms up (first allocations, page faults, threads) for every method alike and is
    # not counted: a training run checkpoints many times, the steady state is what matters.
    for cycle in range(-1, args.checkpoints):
        order = names[cycle % len(names) :] + names[: cycle % len(names)]
        for name in order:
            method = current[0] = methods[name]
            sync(args.device)
            t0 = time.perf_counter()
            method.save(save_id, state_of(model, opt))
            save_id += 1
            call_s = time.perf_counter() - t0
            first, steps_after = None, 0
            while True:
                s, block = step()
                steps_after += 1
                first = first or (s, block)
                d = method.durable()
                if d is not None and steps_after >= 2:
                    break
                if steps_after > 400:
                    raise RuntimeError(f"{name}: not durable after 400 steps")
            if cycle >= 0:
                r = res[name]
                r["blocking"].append(call_s + first[1])
                r["barrier"].append(first[1])
                r["next"].append(first[0])
                r["durable"].append(d - t0)
            current[0] = None
            base_steps.append(step()[0])  # nothing in flight: the baseline step
    base_s = statistics.median(base_steps)
    # One more checkpoint each with the model idle, of a state kept as a reference (outside any
    # timing), then interleaved restores into a model that moved on, each checked bit for bit.
    reference = clone_state(state_of(model, opt))
    out: dict[str, Any] = {}
    for name, method in methods.items():
        current[0] = method
        method.save(save_id, state_of(model, opt))
        save_id += 1
        method.barrier()
        while method.durable() is None:
            time.sleep(0.005)
        current[0] = None
        out[name] = {"bytes_on_disk": method.last_bytes()}
    restores: dict[str, list[float]] = {n: [] for n in methods}
    exact = dict.fromkeys(methods, True)
    for rep in range(args.restores):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            step()
            assert not same(reference["model"], clone_state(model.state_dict()))
            sync(args.device)
            t0 = time.perf_counter()
            methods[name].restore(model, opt)
            sync(args.device)
            restores[name].append(time.perf_counter() - t0)
            exact[name] = exact[name] and same(reference, clone_state(state_of(model, opt)))
    for method in methods.values():
        method.close()
    for name, method in methods.items():
        r = res[name]
        out[name].update(
            method=method.name,
            step_s=base_s,
            blocking_s=statistics.median(r["blocking"]),
            blocking_max_s=max(r["blocking"]),
            next_step_extra_s=statistics.median(r["next"]) - base_s,
            durable_s=statistics.median(r["durable"]),
            durable_range_s=(min(r["durable"]), max(r["durable"])),
            restore_s=statistics.median(restores[name]),
            restore_exact=exact[name],
        )
    return out


def run_every_step(args: argparse.Namespace, base: str) -> dict[str, Any]:
    """GPU check: checkpoint to host memory at every step; blocking per step vs the step time."""
    model, opt = build(args.params, args.width, args.device)
    x = torch.randn(args.batch, args.width, device=args.device)
    ck = Checkpointer(CheckpointConfig(levels=("host://",)))

    def step(barrier: bool) -> tuple[float, float]:
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        tb = time.perf_counter()
        if barrier:
            ck.wait_until_safe_to_mutate()
        block = time.perf_counter() - tb
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        return time.perf_counter() - t0, block

    for _ in range(2):
        step(False)
    plain = [step(False)[0] for _ in range(args.base_steps)]
    blocking, steps = [], []
    for i in range(-2, args.checkpoints):  # two warm-up checkpoints fill both host buffers
        t0 = time.perf_counter()
        ck.save(i + 2, state_of(model, opt))
        call_s = time.perf_counter() - t0
        s, block = step(True)
        if i >= 0:
            blocking.append(call_s + block)
            steps.append(s + call_s)
    # A last checkpoint of a state kept as a reference, then a restore into the moved-on model.
    reference = clone_state(state_of(model, opt))
    ck.save(args.checkpoints + 2, state_of(model, opt))
    ck.wait_until_safe_to_mutate()
    step(False)
    t0 = time.perf_counter()
    ck.restore(levels=["host"], into=state_of(model, opt))
    sync(args.device)
    restore_s = time.perf_counter() - t0
    exact = same(reference, clone_state(state_of(model, opt)))
    ck.close()
    base_s = statistics.median(plain)
    extra_s = statistics.median(steps) - base_s
    print(
        f"every step: plain step {base_s:.3f} s, step with a checkpoint {statistics.median(steps):.3f} s, "
        f"host-side wait at the barrier {statistics.median(blocking):.3f} s (the GPU keeps computing "
        "queued work meanwhile, so the cost is the longer step)"
    )
    return {
        "lowcomm": {
            "method": "lowcomm host level, every step",
            "step_s": base_s,
            # On GPU the host runs ahead of the device: what training loses is the longer step.
            "blocking_s": max(0.0, extra_s),
            "blocking_max_s": max(blocking),
            "next_step_extra_s": extra_s,
            "durable_s": float("nan"),
            "bytes_on_disk": 0,
            "restore_s": restore_s,
            "restore_exact": exact,
        }
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="0.15 GB of state, 3 checkpoints")
    p.add_argument("--params", type=float, default=None, help="model parameters (default 100e6)")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--checkpoints", type=int, default=None)
    p.add_argument("--base-steps", type=int, default=3)
    p.add_argument("--restores", type=int, default=None, help="restores per method (median)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--every-step", action="store_true", help="checkpoint every step (GPU check)")
    p.add_argument("--methods", default="torch.save,dcp,lowcomm")
    p.add_argument("--compression", default="none", choices=["none", "zstd", "shuffle-zstd"])
    p.add_argument(
        "--dir", default=None, help="where to write (default: a temp dir under the repo)"
    )
    args = p.parse_args()
    if args.params is None:
        args.params = 12e6 if args.quick else 100e6
    if args.checkpoints is None:
        args.checkpoints = 3 if args.quick else 5
    if args.restores is None:
        args.restores = 2 if args.quick else 3
    if args.quick:
        args.width = min(args.width, 1024)
    base = args.dir or os.path.join(str(Path(__file__).resolve().parents[1]), ".bench_ckpt")
    os.makedirs(base, exist_ok=True)
    makers: dict[str, Callable[[str], Any]] = {
        "torch.save": lambda root: TorchSave(root),
        "dcp": lambda root: DcpAsync(root, args.device),
        "lowcomm": lambda root: Lowcomm(root, args.compression),
    }
    try:
        if args.every_step:
            results = run_every_step(args, base)
        else:
            makers = {n: makers[n] for n in args.methods.split(",")}
            results = run_all(makers, args, base)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    print(
        f"\nstate ~{args.params * 12 / 1e9:.2f} GB (params + AdamW moments), device {args.device}, "
        f"{args.checkpoints} checkpoints per method interleaved, medians; bytes of one checkpoint"
    )
    hdr = f"{'method':30} {'step s':>7} {'blocks s':>9} {'next step +s':>12} {'durable s':>10} {'(min-max)':>11} {'GB on disk':>10} {'restore s':>9} {'exact':>5}"
    print(hdr)
    print("-" * len(hdr))
    for r in results.values():
        print(
            f"{r['method']:30} {r['step_s']:7.3f} {r['blocking_s']:9.4f} {r['next_step_extra_s']:12.3f} "
            f"{r['durable_s']:10.2f} {'{:.1f}-{:.1f}'.format(*r.get('durable_range_s', (float('nan'),) * 2)):>11} "
            f"{r['bytes_on_disk'] / 1e9:10.3f} {r['restore_s']:9.2f} {r['restore_exact']!s:>5}"
        )
    claims = []
    lc = results.get("lowcomm")
    dc = results.get("dcp")
    ts = results.get("torch.save")

    def claim(name: str, num: float, den: float, goal: float) -> None:
        value = num / max(den, 1e-9)
        claims.append(
            {"name": name, "value": round(value, 4), "goal": f"<= {goal}", "ok": value <= goal}
        )

    if lc and dc:
        claim("stall_vs_dcp", lc["blocking_s"], dc["blocking_s"], 1.0)
    if lc and ts:
        claim("stall_vs_torch_save", lc["blocking_s"], ts["blocking_s"], 0.05)
    if lc and dc:
        claim("durable_vs_dcp", lc["durable_s"], dc["durable_s"], 0.7)
        claim("restore_vs_dcp", lc["restore_s"], dc["restore_s"], 1.0)
    if lc and args.every_step:
        claim("gpu_blocking_vs_step", lc["blocking_s"], lc["step_s"], 0.05)
    if not all(r["restore_exact"] for r in results.values()):
        claims.append({"name": "restore_exact", "value": False, "goal": "bit-exact", "ok": False})
    print(json.dumps({"benchmark": "checkpoint", "claims": claims}))


if __name__ == "__main__":
    main()
