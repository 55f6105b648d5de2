"""Which inputs a ``prepare`` job of a job array tokenizes, and where it writes them (see ``prepare_jobs``)."""

from __future__ import annotations

from pathlib import Path

from lit_overtok.data.text_inputs import PrepareError

JOBS_FOLDER = "jobs"


def job_dir(output: Path, index: int, count: int) -> Path:
    return Path(output) / JOBS_FOLDER / f"job-{index:05d}-of-{count:05d}"


def check_job(index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        raise PrepareError(f"--job-index must be in [0, --job-count) and --job-count positive, got {index} of {count}")


def job_inputs(inputs: dict[str, list[Path]], index: int, count: int) -> dict[str, list[Path]]:
    """Job ``index``'s share: the files whose byte midpoint, in the sequence of all inputs (splits in order), falls
    in its 1/count of the total bytes. Contiguous, in order, every file in exactly one job; a job may get none."""
    sequence = [(split, path) for split, files in inputs.items() for path in files]
    sizes = [max(1, path.stat().st_size) for _, path in sequence]
    total, before = sum(sizes), 0
    mine: dict[str, list[Path]] = {split: [] for split in inputs}
    for (split, path), size in zip(sequence, sizes):
        if min(count - 1, (2 * before + size) * count // (2 * total)) == index:
            mine[split].append(path)
        before += size
    return mine
