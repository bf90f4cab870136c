"""Evaluation: edit metrics per fact (`metrics`), unlearning metrics (`forget`, `forget_compare`), what a ladder
scores per model (`scoring`) and the `--require` gates (`gate`). Every measure runs through a runner."""
