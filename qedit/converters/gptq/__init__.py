"""GPTQ checkpoints: the on-disk layout (`checkpoint`), whole-model calibration (`calibrate`) and writing,
patching and loading checkpoints (`export`)."""
