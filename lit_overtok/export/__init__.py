"""Export a checkpoint to Hugging Face ``transformers`` (``hf``: the mapping; the command is ``lit_overtok.cli.export``).

    python train.py export --checkpoint runs/x/version_0/checkpoints/last.ckpt --out hf_model
    lit-overtok-export --checkpoint runs/x/version_0/checkpoints/last.ckpt --out hf_model      # the same

``remote_code/`` holds the model classes copied into exports with Over-Encoding or a joint head (package data: they
import transformers, and lit_overtok never imports them).
"""
