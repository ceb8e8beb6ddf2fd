"""What "active" means, per layer: a threshold on the activation magnitude.

ReLU models: a neuron is active when its activation is positive (threshold 0). SwiGLU models have
no exact zeros, so a neuron counts as active when |silu(gate) * up| clears a per-layer threshold,
set on the calibration tokens so that a target share of (token, neuron) pairs falls below it.
"""

from __future__ import annotations

import numpy as np

from flashjax.config import ModelConfig

# Dropping the smallest 50% of |silu(gate) * up| with the true magnitudes costs about 3% perplexity on
# the default model (SmolLM2-135M, DESIGN.md), the most a default setting should cost.
DEFAULT_SWIGLU_SPARSITY = 0.5


def default_target_sparsity(cfg: ModelConfig) -> float | None:
    """The share of neurons dropped by default: 0.5 for SwiGLU, None (exact zeros only) for ReLU."""
    return DEFAULT_SWIGLU_SPARSITY if cfg.is_glu else None


def quantile_threshold(magnitudes: np.ndarray, share: float) -> float:
    """The value below or at which `share` of `magnitudes` lie (every element counts the same)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the share of neurons to drop must be in [0, 1), got {share}")
    flat = np.asarray(magnitudes, dtype=np.float32).reshape(-1)
    if share == 0.0 or flat.size == 0:
        return 0.0
    k = min(flat.size - 1, max(0, int(np.ceil(share * flat.size)) - 1))
    return float(np.partition(flat, k)[k])


def activation_threshold(cfg: ModelConfig, magnitudes: np.ndarray, target_sparsity: float | None) -> float:
    """One layer's threshold on |activation| (labels are `magnitudes > threshold`).

    ReLU: 0 (active = positive); with a target, the quantile when it lies above 0 (a ReLU layer is
    usually sparser than any target already). SwiGLU: the `target_sparsity` quantile.
    """
    if target_sparsity is None:
        if cfg.is_glu:
            raise ValueError("a SwiGLU model has no exact zeros: give a target sparsity")
        return 0.0
    return max(0.0, quantile_threshold(magnitudes, target_sparsity))


def activation_thresholds(cfg: ModelConfig, activations, target_sparsity: float | None) -> np.ndarray:
    """Per-layer thresholds [L] from `collect_activations` output (every layer must be present)."""
    return np.array([activation_threshold(cfg, activations[l].a, target_sparsity) for l in range(cfg.n_layers)],
                    np.float32)


def dropped_share(magnitudes: np.ndarray, threshold: float) -> float:
    """Share of (token, neuron) pairs at or below `threshold`: what the threshold drops."""
    return float(np.mean(np.asarray(magnitudes, np.float32) <= threshold))


def active_labels(magnitudes: np.ndarray, threshold: float) -> np.ndarray:
    """The training labels: bool [N, F], True where a neuron is active."""
    return np.asarray(magnitudes, np.float32) > threshold
