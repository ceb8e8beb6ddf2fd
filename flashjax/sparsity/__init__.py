"""Which FFN neurons a token needs, known before the weights are read.

- `collect`: run the dense model over calibration text, record each layer's FFN input and
  activations (and write calibration text from built-in prompts, so none is needed);
- `thresholds`: what "active" means per layer (ReLU: positive; SwiGLU: a calibrated quantile);
- `predictor`: the paper's low-rank predictors (training with optax, scoring, selection);
- `gate`: the training-free SwiGLU path (resident gate projection, thresholded |silu(gate)|);
- `storage`: `Predictors` (what the engine calls) saved in/loaded from <model_dir>/predictors;
- `calibrate`: all of the above for a converted model (`flashjax calibrate`).

The engine's calls:

    pred = load_predictors(model_dir)              # None when the model was never calibrated
    ids = pred.needed_ids(l, h)                    # layer l's neurons from its FFN input h [..., D]
    ahead = pred.lookahead_ids(l + 1, h)           # layer l+1's neurons from layer l's FFN input
    ids = pred.gate_ids(l, h, w_gate[l])           # gate path (SwiGLU), w_gate [F, D] resident
"""

from flashjax.sparsity.calibrate import CalibrationConfig, calibrate, default_rank, default_rank_last
from flashjax.sparsity.collect import (Activations, LayerActivations, collect_activations, default_calibration_text,
                                       generate_calibration_ids, token_sequences)
from flashjax.sparsity.gate import (GateSelector, gate_keep_ids, gate_magnitude, gate_magnitudes, gate_threshold,
                                    load_gate_weights)
from flashjax.sparsity.predictor import Selection, TrainConfig, predict_scores, select, train_predictor
from flashjax.sparsity.storage import (PREDICTORS_DIR, Predictors, PredictorsError, has_predictors, load_predictors,
                                       require_predictors, save_predictors)
from flashjax.sparsity.thresholds import (activation_threshold, activation_thresholds, default_target_sparsity,
                                          dropped_share, quantile_threshold)

__all__ = ["Activations", "CalibrationConfig", "GateSelector", "LayerActivations", "PREDICTORS_DIR", "Predictors",
           "PredictorsError", "Selection", "TrainConfig", "activation_threshold", "activation_thresholds",
           "calibrate", "collect_activations", "default_calibration_text", "default_rank", "default_rank_last",
           "default_target_sparsity", "dropped_share", "gate_keep_ids", "gate_magnitude", "gate_magnitudes",
           "gate_threshold", "generate_calibration_ids", "has_predictors", "load_gate_weights", "load_predictors",
           "predict_scores", "quantile_threshold", "require_predictors", "save_predictors", "select",
           "token_sequences", "train_predictor"]
