"""``prepare`` split over independent jobs (a SLURM array, or any launcher), and the merge of their outputs.

The paper's runs read 500B tokens (about 2 TB of text); tokenizing at ~1.1 MB of text per CPU-second takes weeks on
one machine. With ``--job-index i --job-count n`` a ``prepare`` run tokenizes only its share of the inputs: a
contiguous run of whole input files (train files, then validation files, in the given order), balanced by bytes,
into ``<output>/jobs/job-<i>-of-<n>/`` as a complete prepared dataset of its own. ``merge`` then streams the jobs'
documents in job order into the final shards and manifest: exactly the documents, in exactly the order, that one
``prepare`` of all inputs reads, through the same shard writer, so the merged ``<output>`` is byte-identical to a
single job's (the test checks every file). The merge only re-packs tokens (no tokenizer): it runs at disk speed, and
removes the job folders when done (``--keep-parts`` keeps them).

    # SLURM: configs/slurm/prepare_array.sbatch is one array task (its header shows the array + merge); by hand:
    python -m lit_overtok.data.prepare --output data/corpus --tokenizer tok.json --train 'raw/*.jsonl.zst' \\
        --job-index $SLURM_ARRAY_TASK_ID --job-count $SLURM_ARRAY_TASK_COUNT
    python -m lit_overtok.data.prepare_jobs merge --output data/corpus
    # or submitit (SLURM, or --cluster local for a test on this machine), waiting for the array, then merging:
    python -m lit_overtok.data.prepare_jobs submit --jobs 64 --partition cpu -- \\
        --output data/corpus --tokenizer tok.json --train 'raw/*.jsonl.zst'

A job given ``--vocab-size`` trains the BPE on the first MB of the *whole* training input, as one job would (the
same tokenizer in every job: the merge checks its sha256); giving ``--tokenizer`` saves every job that training.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from lit_overtok.data import shards
from lit_overtok.data.job_split import JOBS_FOLDER, job_dir
from lit_overtok.data.prepare import build_parser as prepare_parser, main as prepare_main
from lit_overtok.data.shard_writer import ShardWriter, SplitProgress, write_json_atomically
from lit_overtok.data.text_inputs import PrepareError
from lit_overtok.errors import entry_point

def merge(output: Path, count: Optional[int] = None, keep_parts: bool = False) -> dict:
    """Re-pack the job folders under ``output`` into its shards and manifest; returns the manifest."""
    output = Path(output)
    parts = sorted((output / JOBS_FOLDER).glob("job-*-of-*"))
    counts = {int(p.name.rsplit("-", 1)[1]) for p in parts}
    count = count if count is not None else (counts.pop() if len(counts) == 1 else None)
    if count is None:
        raise PrepareError(f"{output / JOBS_FOLDER}: no job folders, or folders of different --job-count "
                           f"({sorted(counts)}); give --job-count")
    manifests = []
    for index in range(count):
        path = job_dir(output, index, count) / shards.MANIFEST_NAME
        if not path.is_file():
            raise PrepareError(f"job {index} of {count} has not finished: {path} is missing (rerun that job)")
        manifests.append(shards.Manifest.load(path))
    first = manifests[0]
    for index, manifest in enumerate(manifests):
        if manifest.compatibility() != first.compatibility():
            raise PrepareError(f"job {index}'s tokenizer or vocabulary differs from job 0's "
                               f"({manifest.path} vs {first.path}); rerun the jobs with the same --tokenizer")
    provenance = json.loads(first.path.read_text())["provenance"]
    inputs = provenance["job"]["all_inputs"]
    del provenance["job"]
    for existing in [output / shards.MANIFEST_NAME, *output.glob("*.tar")]:
        existing.unlink(missing_ok=True)  # an earlier, interrupted merge
    written: dict[str, list[shards.ShardInfo]] = {}
    for split in inputs:
        # The single job's shard writer, so the bytes are the same.
        state = SplitProgress()
        sink = ShardWriter(output, split, provenance["shard_tokens"], state)
        for manifest in manifests:
            for info in manifest.splits.get(split, ()):
                documents = shards.read_shard(str(manifest.directory / info.file), info, manifest.dtype)
                sink.add(np.concatenate(documents), np.array([len(d) for d in documents]))
        sink.flush()
        written[split] = state.shards
    shutil.copyfile(first.directory / first.tokenizer_file, output / shards.TOKENIZER_NAME)
    manifest = shards.manifest_dict(first.tokenizer_sha256, first.vocab_size, first.eos_id, written,
                                    {**provenance, "inputs": inputs})
    write_json_atomically(output / shards.MANIFEST_NAME, manifest)
    if not keep_parts:
        shutil.rmtree(output / JOBS_FOLDER)
    return manifest


def submit(prepare_args: list[str], jobs: int, folder: Path, cluster: Optional[str], partition: Optional[str],
           timeout_min: int, cpus_per_job: int, keep_parts: bool) -> dict:
    """Run ``prepare`` as a job array through submitit (SLURM, or ``cluster="local"``), wait, then merge."""
    try:
        import submitit
    except ImportError:
        raise PrepareError("prepare_jobs submit needs submitit: pip install 'lit_overtok[cluster]'") from None

    output = Path(prepare_parser().parse_args(prepare_args).output)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(timeout_min=timeout_min, cpus_per_task=cpus_per_job, slurm_array_parallelism=jobs,
                               **({"slurm_partition": partition} if partition else {}))
    arguments = [prepare_args + ["--job-index", str(i), "--job-count", str(jobs), "--no-progress"]
                 for i in range(jobs)]
    submitted = executor.map_array(prepare_main, arguments)
    for job in submitted:
        job.result()  # raises with the job's traceback if it failed
    return merge(output, jobs, keep_parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lit_overtok.data.prepare_jobs", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge_parser = commands.add_parser("merge", help="merge the finished jobs' folders into the final dataset")
    merge_parser.add_argument("--output", required=True, help="the --output the jobs were given")
    merge_parser.add_argument("--job-count", type=int, help="default: from the job folders")
    merge_parser.add_argument("--keep-parts", action="store_true", help="keep <output>/jobs after merging")
    submit_parser = commands.add_parser("submit", help="run prepare as a submitit job array, then merge")
    submit_parser.add_argument("--jobs", type=int, required=True, help="number of array jobs")
    submit_parser.add_argument("--folder", default="submitit_prepare", help="submitit's logs and pickles")
    submit_parser.add_argument("--cluster", choices=["slurm", "local", "debug"], help="default: SLURM if present")
    submit_parser.add_argument("--partition", help="SLURM partition")
    submit_parser.add_argument("--timeout-min", type=int, default=24 * 60)
    submit_parser.add_argument("--cpus-per-job", type=int, default=8, help="also pass --workers to prepare")
    submit_parser.add_argument("--keep-parts", action="store_true")
    submit_parser.add_argument("prepare_args", nargs=argparse.REMAINDER, help="-- then prepare's own arguments")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Merge or submit; bad input raises (``run``, the command, makes it one line)."""
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        manifest = merge(Path(args.output), args.job_count, args.keep_parts)
    else:
        prepare_args = args.prepare_args[1:] if args.prepare_args[:1] == ["--"] else args.prepare_args
        manifest = submit(prepare_args, args.jobs, Path(args.folder), args.cluster, args.partition,
                          args.timeout_min, args.cpus_per_job, args.keep_parts)
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['documents']} documents, {entry['tokens']} tokens in {len(entry['shards'])} shards")


run = entry_point(main)  # python -m lit_overtok.data.prepare_jobs: bad input is one line, exit status 2 (errors.py)

if __name__ == "__main__":
    run()
