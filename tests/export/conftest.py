"""The Hugging Face stack offline, and remote code copied into a temporary folder instead of ~/.cache."""

import os
import tempfile

for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[flag] = "1"
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))
