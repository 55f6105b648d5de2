"""Checkpoints: the file format and its integrity checks, atomic writes, finding the checkpoint to resume, when a run
saves, and loading a checkpoint for inference without Lightning."""
