"""Evaluation: one set of metric names (docs/eval.md) for the evaluation during training and the command line.

- `metrics`: the measures as tensor functions (logits -> mask -> intersection / union -> IoUs; METEOR);
- `training`: `evaluate(runtime, batches)`, the `eval/*` metrics a run logs;
- `protocol`: `evaluate_model(model, samples)`, a model on held-out regions by the RefCOCO protocol;
- `inputs`: the model of a checkpoint and the regions of a split, for the command line;
- `cli`: `python -m dualrl.eval CHECKPOINT ...`.
"""
