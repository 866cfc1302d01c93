"""Prints, for every outer-loop method, the hash of a seeded in-process run's final outer parameters.

A refactor that claims "behaviour unchanged" runs this before and after and compares the lines:
the runs are seeded and in-process (``LocalGroup``), so the hashes are bit-reproducible on one
machine and torch build. DyLU (``dynamic_local_steps``) is left out: it times the peers.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from lowcomm.diloco import OuterConfig

try:  # the layout after the redesign, then the one before it
    from lowcomm.launch.tinygpt import GPTConfig
except ImportError:  # pragma: no cover - the pre-redesign tree
    from lowcomm.launch._tinygpt import GPTConfig  # type: ignore[no-redef]
try:
    from lowcomm.launch.experiments import Corpus, simulate
except ImportError:  # pragma: no cover
    from lowcomm.launch._experiments import Corpus, simulate  # type: ignore[no-redef]

CONFIGS = {
    "diloco_fp32": dict(method="diloco", sync_every=5, quantization="none"),
    "diloco_uint8": dict(method="diloco", sync_every=5),
    "diloco_fp4": dict(method="diloco", sync_every=5, quantization="fp4"),
    "diloco_topk": dict(method="diloco", sync_every=5, quantization="topk"),
    "async_eager": dict(method="async", sync_every=5),
    "async_naive": dict(method="async", sync_every=5, eager=False),
    "async_tau2": dict(method="async", sync_every=5, apply_after_steps=2),
    "streaming": dict(method="streaming", sync_every=6, num_fragments=3, overlap_steps=1),
    "co2": dict(method="co2", sync_every=5),
    "co2_penalty_momentum": dict(
        method="co2", sync_every=5, co2_gap_penalty=2.0, outer_momentum=0.5
    ),
    "delayed_nesterov": dict(method="delayed_nesterov", sync_every=5, dn_period=2),
}


def main() -> None:
    torch.set_num_threads(1)
    corpus = Corpus.load(max_bytes=200_000)
    gpt = GPTConfig(num_layers=1, width=32, num_heads=2, context=32)
    out = {}
    for name, kw in CONFIGS.items():
        captured = {}
        import lowcomm.diloco as d

        orig = d.DiLoCo.finish

        def finish(self, *a, _orig=orig, captured=captured, **k):  # type: ignore[no-untyped-def]
            r = _orig(self, *a, **k)
            captured.setdefault(
                "h", hashlib.sha256(self.outer_params.numpy().tobytes()).hexdigest()
            )
            return r

        d.DiLoCo.finish = finish  # type: ignore[method-assign]
        try:
            res = simulate(
                name,
                corpus=corpus,
                gpt=gpt,
                steps=31,
                batch_size=4,
                lr=2e-3,
                num_replicas=3,
                outer=OuterConfig(**kw),  # type: ignore[arg-type]
            )
        finally:
            d.DiLoCo.finish = orig  # type: ignore[method-assign]
        out[name] = {"outer_sha256": captured["h"][:16], "val_loss": round(res.val_loss, 6)}
        print(f"{name:18s} {captured['h'][:16]} {res.val_loss:.6f}", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
