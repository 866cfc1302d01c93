"""Splits a nested state (dicts, lists, tuples of tensors and plain values) into tensors and a skeleton.

The skeleton is the state with every tensor replaced by a numbered placeholder, pickled at once on the
caller's thread: plain values (step counters, RNG tuples, data positions) are small and may change
right after ``save``, so they are captured eagerly; tensors are only referenced, never cloned here.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TensorRef",
    "copy_into",
    "flatten_state",
    "restore_state",
    "template_tensors",
    "unflatten_state",
]


class _TensorSlot:
    """Placeholder for the tensor with index ``index`` in the flattened list."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[type[_TensorSlot], tuple[int]]:
        return (_TensorSlot, (self.index,))


@dataclass
class TensorRef:
    """One tensor of the state: where it sits, and the local data to copy (a DTensor's local shard)."""

    key: str
    tensor: torch.Tensor  # plain (local) tensor, any device
    dtensor: dict[str, Any] | None  # global shape and placements of a DTensor, else None


def _dtensor_type() -> type | None:
    # Importing torch.distributed.tensor costs ~0.9 s; a state holding DTensors has imported it.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def flatten_state(state: Any) -> tuple[bytes, list[TensorRef]]:
    """Return (pickled skeleton, tensors in a deterministic order). Does not copy tensor data."""
    dtensor_cls = _dtensor_type()
    refs: list[TensorRef] = []

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            meta: dict[str, Any] | None = None
            data = obj
            if dtensor_cls is not None and isinstance(obj, dtensor_cls):
                dt: Any = obj
                # Where this shard sits in the global tensor (DCP's chunk protocol), so that a
                # checkpoint of N ranks can be restored on M (``_reshard``).
                chunk = dt.__create_chunk_list__()[0]
                meta = {
                    "global_shape": list(dt.shape),
                    "placements": [repr(p) for p in dt.placements],
                    "mesh_shape": list(dt.device_mesh.shape),
                    "offsets": [int(o) for o in chunk.offsets],
                    "local_shape": [int(n) for n in chunk.sizes],
                }
                data = dt.to_local()
            refs.append(TensorRef(key=path, tensor=data.detach(), dtensor=meta))
            return _TensorSlot(len(refs) - 1)
        if isinstance(obj, dict):
            return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if type(obj) is tuple:  # namedtuples and other subclasses are pickled whole
            return tuple(walk(v, f"{path}/{i}") for i, v in enumerate(obj))
        return obj

    skeleton = walk(state, "")
    try:
        blob = pickle.dumps(skeleton, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise ValueError(
            f"checkpoint state must be nested dicts/lists/tuples of tensors and picklable values: {e}"
        ) from e
    return blob, refs


def unflatten_state(skeleton: bytes, tensors: list[torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``: the state with placeholders replaced by ``tensors``.

    Checkpoints are trusted input: the skeleton is unpickled (as ``torch.load(weights_only=False)``).
    """
    tree = pickle.loads(skeleton)

    def walk(obj: Any) -> Any:
        if isinstance(obj, _TensorSlot):
            return tensors[obj.index]
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if type(obj) is tuple:
            return tuple(walk(v) for v in obj)
        return obj

    return walk(tree)


def copy_into(template: Any, restored: Any, *, path: str = "") -> Any:
    """Copy ``restored`` into ``template``'s tensors in place (DTensors: into their local shard).

    Returns the template with non-tensor values replaced by the restored ones. Raises ``ValueError``
    when the structures, shapes or dtypes differ (a checkpoint of another model or sharding).
    """
    dtensor_cls = _dtensor_type()
    if isinstance(template, torch.Tensor):
        if not isinstance(restored, torch.Tensor):
            raise ValueError(
                f"{path or '<root>'}: template has a tensor, checkpoint has {type(restored)}"
            )
        dst: Any = template
        if dtensor_cls is not None and isinstance(template, dtensor_cls):
            dst = dst.to_local()
        if dst.shape != restored.shape or dst.dtype != restored.dtype:
            raise ValueError(
                f"{path or '<root>'}: template is {tuple(dst.shape)} {dst.dtype}, checkpoint is "
                f"{tuple(restored.shape)} {restored.dtype} (another model, or another sharding?)"
            )
        same_memory = (
            dst.data_ptr() == restored.data_ptr()
            and dst.stride() == restored.stride()
            and dst.device == restored.device
        )
        if not same_memory:  # restore may have read straight into the template already
            with torch.no_grad():
                dst.copy_(restored)
        return template
    if isinstance(template, dict):
        if not isinstance(restored, dict):
            raise ValueError(
                f"{path or '<root>'}: template has a dict, checkpoint has {type(restored)}"
            )
        missing = set(restored) - set(template)
        for k in missing:
            template[k] = restored[k]
        for k in list(template):
            if k not in restored:
                raise ValueError(f"{path}/{k}: in the template but not in the checkpoint")
            template[k] = copy_into(template[k], restored[k], path=f"{path}/{k}")
        return template
    if isinstance(template, list) and isinstance(restored, list) and len(template) == len(restored):
        for i in range(len(template)):
            template[i] = copy_into(template[i], restored[i], path=f"{path}/{i}")
        return template
    return restored


def template_tensors(into: Any) -> dict[str, torch.Tensor] | None:
    """Key -> tensor of a restore template (its parameters, its moments), so a level can read
    straight into them; None without a template."""
    if into is None:
        return None
    return {ref.key: ref.tensor for ref in flatten_state(into)[1]}


def restore_state(skeleton: bytes, tensors: list[torch.Tensor], into: Any) -> Any:
    """The state a level read (skeleton and tensors), copied into ``into`` when it is given."""
    state = unflatten_state(skeleton, tensors)
    return state if into is None else copy_into(into, state)
