"""Error feedback: keep what a lossy codec did not transmit and add it to the next tensor of that name."""

from __future__ import annotations

import logging

import torch

from lowcomm.compression._codec import Codec
from lowcomm.compression._encoded import Encoded

__all__ = ["ErrorFeedback"]

logger = logging.getLogger(__name__)


class ErrorFeedback:
    """Wraps a codec so that, over many calls, the decoded tensors sum to the inputs' sum.

    For each ``name`` it keeps a residual e (fp32, same shape and device as that name's tensors)::

        acc = decay * e + x;   enc = codec.encode(acc);   e = acc - codec.decode(enc)

    With ``decay=1`` this gives, exactly up to fp32 rounding, sum(decoded) + e == sum(inputs)
    after every call, so the error of the running sum stays bounded by one residual instead of
    growing with the number of rounds. ``decay < 1`` is SparseLoCo's momentum-style variant.

    Who calls: the sender, once per outer step per tensor, before transmitting. Not thread-safe:
    use one instance per sending thread. The residuals are training state: checkpoint them with
    ``state_dict``.

    Args:
        codec: any ``Codec``; lossy ones (topk, fp4, uint8) are the point.
        decay: multiplies the residual before it is added (1.0 = classic error feedback).
    """

    def __init__(self, codec: Codec, *, decay: float = 1.0) -> None:
        if not isinstance(decay, int | float) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a float in [0, 1], got {decay!r}")
        self.codec = codec
        self.decay = float(decay)
        self._residuals: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        return list(self._residuals)

    def encode(self, name: str, tensor: torch.Tensor) -> Encoded:
        """Encodes ``tensor`` plus the residual kept for ``name`` and updates that residual.

        Returns an ``Encoded`` that decodes to ``tensor``'s dtype and shape. If encoding raises
        (NaN/inf input), the residual is left as it was.

        Raises:
            ValueError: ``tensor`` has a different shape or device than earlier tensors of
                ``name`` (call ``reset(name)`` first), or the codec rejects it.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ErrorFeedback.encode needs a tensor, got {type(tensor).__name__}")
        residual = self._residuals.get(name)
        if residual is not None and (
            residual.shape != tensor.shape or residual.device != tensor.device
        ):
            raise ValueError(
                f"error feedback for {name!r}: tensor has shape {tuple(tensor.shape)} on {tensor.device}, "
                f"its residual has {tuple(residual.shape)} on {residual.device}; call reset({name!r}) when a tensor changes"
            )
        acc = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
        acc.copy_(tensor.detach())
        if residual is not None:
            acc.add_(residual, alpha=self.decay)
        encoded = self.codec.encode(acc)
        acc.sub_(self.codec.decode(encoded))
        self._residuals[name] = acc
        return encoded.with_dtype(tensor.dtype)

    def decode(self, encoded: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        """The wrapped codec's ``decode`` (receivers need no state)."""
        return self.codec.decode(encoded, out)

    def residual(self, name: str) -> torch.Tensor | None:
        """The residual kept for ``name`` (do not modify it), or None."""
        return self._residuals.get(name)

    def reset(self, name: str | None = None) -> None:
        """Drops the residual of ``name``, or of every name when None."""
        if name is None:
            self._residuals.clear()
        else:
            self._residuals.pop(name, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every residual, by name."""
        return {k: v.clone() for k, v in self._residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replaces every residual with (fp32 copies of) ``state``."""
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ValueError("ErrorFeedback state must map names to tensors")
        self._residuals = {k: v.detach().to(torch.float32, copy=True) for k, v in state.items()}
