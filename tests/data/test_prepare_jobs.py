"""``prepare`` split over independent jobs: several local job processes (and a submitit array) whose outputs merge
into a dataset byte-identical, file by file, to one job's."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_overtok.data.job_split import job_inputs
from lit_overtok.data.prepare import PrepareConfig, prepare
from lit_overtok.data.prepare_jobs import main as jobs_main
from lit_overtok.data.text_inputs import PrepareError

REPO = Path(__file__).resolve().parents[2]


def corpus(tmp_path: Path) -> tuple[list[str], list[str]]:
    """Five training files of different sizes and one validation file."""
    train = []
    for f, count in enumerate((30, 5, 60, 1, 20)):
        path = tmp_path / f"train-{f}.jsonl.gz"
        with gzip.open(path, "wt") as out:
            for i in range(count):
                out.write(json.dumps({"text": f"file {f} doc {i}: " + "lorem ipsum dolor " * (1 + (i * 7) % 11)}) + "\n")
        train.append(str(path))
    validation = tmp_path / "validation.jsonl.gz"
    with gzip.open(validation, "wt") as out:
        out.write("".join(json.dumps({"text": f"held out {i}"}) + "\n" for i in range(9)))
    return train, [str(validation)]


def options(output: Path, train: list[str], validation: list[str]) -> list[str]:
    # A trained BPE: every job must train the same one from the start of the whole --train list.
    return ["--output", str(output), "--vocab-size", "300", "--train", *train, "--validation", *validation,
            "--shard-tokens", "400", "--workers", "1", "--no-progress"]


def assert_same_files(one: Path, other: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    assert len(names) > 6  # manifest, tokenizer and several shards of each split
    for name in names:
        assert (one / name).read_bytes() == (other / name).read_bytes(), name


def test_local_job_processes_merge_into_the_single_job_output(tmp_path):
    train, validation = corpus(tmp_path)
    single = tmp_path / "single"
    prepare(PrepareConfig(output=single, train=train, validation=validation, vocab_size=300, shard_tokens=400,
                          workers=1, progress=False))
    split = tmp_path / "split"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-m", "lit_overtok.data.prepare", *options(split, train, validation),
                              "--job-index", str(i), "--job-count", "3"], env=env, stderr=subprocess.PIPE, text=True)
            for i in range(3)]
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.stderr.read()[-3000:]
    jobs_main(["merge", "--output", str(split)])
    assert_same_files(single, split)  # the job folders are gone, the rest is byte for byte the same


def test_more_jobs_than_files_and_a_submitit_array(tmp_path):
    train, validation = corpus(tmp_path)
    single = tmp_path / "single"
    prepare(PrepareConfig(output=single, train=train, validation=validation, vocab_size=300, shard_tokens=400,
                          workers=1, progress=False))
    # 8 jobs over 6 files: some jobs tokenize nothing. submitit's in-process "debug" cluster stands in for SLURM.
    jobs_main(["submit", "--jobs", "8", "--cluster", "debug", "--folder", str(tmp_path / "submitit"), "--",
               *options(tmp_path / "array", train, validation)])
    assert_same_files(single, tmp_path / "array")


def test_jobs_take_contiguous_byte_balanced_shares_and_merge_checks_completion(tmp_path):
    train, validation = corpus(tmp_path)
    inputs = {"train": [Path(p) for p in train], "validation": [Path(p) for p in validation]}
    shares = [job_inputs(inputs, i, 3) for i in range(3)]
    # Contiguous: job after job, the shares are the inputs in order (train, then validation), each file once.
    assert [p for share in shares for split in ("train", "validation") for p in share[split]] == \
        inputs["train"] + inputs["validation"]
    assert all(share["train"] or share["validation"] for share in shares)
    prepare(PrepareConfig(output=tmp_path / "out", train=train, validation=validation, vocab_size=300,
                          workers=1, progress=False, job_index=0, job_count=2))
    with pytest.raises(PrepareError, match="job 1 of 2 has not finished"):
        jobs_main(["merge", "--output", str(tmp_path / "out")])
    with pytest.raises(PrepareError, match="--job-index must be in"):
        PrepareConfig(output=tmp_path, train=train, vocab_size=300, job_index=2, job_count=2)
