"""Recording: each sample's score goes to the epoch's delta writer; the loss is weighted.

``ScoreRecorder`` owns the ``DeltaWriter`` of the epoch in progress on this rank. Losses
come detached, in float32; the weighted mean is what the trainer backpropagates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..storage import DeltaWriter


class ScoreRecorder:
    """The scores of one epoch on one rank, on their way to the store."""

    def __init__(self, writer: DeltaWriter):
        self.writer = writer

    def record(self, hashes: np.ndarray, scores: torch.Tensor) -> None:
        """Record ``scores`` (one per key hash) as the keys' latest scores."""
        self.writer.record(hashes, scores.detach().float().cpu().numpy())  # one device-to-host copy

    def wait(self) -> None:
        """Wait for the background writes already started (what was buffered stays buffered)."""
        self.writer.wait()

    def flush(self) -> None:
        """Write everything recorded; when it returns, the epoch's scores are in the store."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def weighted_mean(loss: torch.Tensor, weights: Any) -> torch.Tensor:
    """``mean(loss * weights)``, with the weights on the loss's device."""
    weights = torch.as_tensor(weights, device=loss.device).to(loss.dtype)
    return (loss * weights).mean()
