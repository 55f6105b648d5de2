"""``prepare`` at the edges: text that is not UTF-8, documents of many megabytes in bounded memory (and exactly the
ids of the whole), and a run stopped by Ctrl-C, a full disk or SIGKILL that continues with ``--resume`` to the
bytes an uninterrupted run writes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lit_overtok.data import encoding, shards
from lit_overtok.data.prepare import PrepareConfig, PrepareError, main, prepare
from lit_overtok.data.shard_writer import PROGRESS_NAME
from tests.fixtures import real_data

ROOT = Path(__file__).resolve().parents[2]


def corpus(tmp_path: Path, documents: int = 60) -> Path:
    path = tmp_path / "train.jsonl"
    texts = [f"Document {i}: " + " ".join(f"word{(i * j) % 97} and more text, it's {j}." for j in range(30))
             for i in range(documents)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def config(tmp_path: Path, name: str, train: Path, tokenizer: Path, **options) -> PrepareConfig:
    defaults = dict(output=tmp_path / name, train=[str(train)], validation=[str(train)], tokenizer=str(tokenizer),
                    shard_tokens=700, workers=1, progress=False)
    return PrepareConfig(**(defaults | options))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def fail_on_shard(monkeypatch, number: int, error: BaseException) -> None:
    """The ``number``-th shard write fails with ``error`` after writing half its bytes (a real partial file)."""
    write, calls = shards.write_shard, []

    def failing(path, documents, first_document):
        calls.append(path)
        if len(calls) == number:
            path.with_name(path.name + ".partial").write_bytes(b"\0" * 512)
            raise error
        return write(path, documents, first_document)

    monkeypatch.setattr(shards, "write_shard", failing)


# --------------------------------------------------------------------------------------------- bad text
def test_text_that_is_not_utf8_is_an_error_naming_the_file_or_replaced_on_request(tmp_path, text_tokenizer):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Straße und Käse\n".encode("latin-1"))
    with pytest.raises(PrepareError, match=f"{bad} is not UTF-8 text .* pass --encoding-errors replace"):
        prepare(config(tmp_path, "a", bad, text_tokenizer, validation=[]))
    prepare(config(tmp_path, "b", bad, text_tokenizer, validation=[], encoding_errors="replace"))
    manifest = shards.Manifest.load(tmp_path / "b" / "manifest.json")
    [document] = shards.read_shard(str(tmp_path / "b" / manifest.splits["train"][0].file),
                                   manifest.splits["train"][0], manifest.dtype)
    assert Tokenizer.from_file(str(text_tokenizer)).decode(document[:-1].tolist()).startswith(
        "Stra\ufffde")


# ------------------------------------------------------------------------------------- long documents
TRICKY = ("Caf\u00e9 cafe\u0301 na\u00efve it's we'll 12345678 3.14159 --- \u2713\u2713 \u4e2d\u6587 "
          "<|endoftext|> tabs\t\there  spaces   and\n\n\nnewlines \U0001F600 aaaaaaaaaaaaaaaaaaaaaaaaaaa, ok. ")


# GPT-2's, GPT-NeoX's and OLMo-2's own tokenizers pre-tokenize differently, and the pieces must give exactly their
# ids: the point is those real files, so they are used from the data folder when there is one (skipped otherwise).
@pytest.mark.parametrize("name", ["gpt2/tokenizer.json", "gpt-neox-20b/tokenizer.json", "olmo/allenai_dolma2.json",
                                  "trained"])
def test_long_documents_encode_in_pieces_to_exactly_the_ids_of_the_whole(name, text_corpus, monkeypatch):
    path = text_corpus / "tokenizer.json" if name == "trained" else real_data(f"tokenizers/{name}")
    tokenizer = Tokenizer.from_file(str(path))
    assert encoding.can_cut(json.loads(path.read_text()))
    monkeypatch.setattr(encoding, "LONG_DOCUMENT_CHARS", 1000)
    monkeypatch.setattr(encoding, "PIECE_CHARS", 300)
    text = "".join(TRICKY[i % 7:] + f" {i} " for i in range(400))
    encoding.init_encoder(tokenizer.to_str(), 0, "<u4", single_threaded=False)
    cuts = encoding.cut_points(tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer else text, tokenizer,
                               encoding._worker_state["added"], 300)
    assert len(cuts) > 50
    tokens, lengths = encoding.encode([text, "short one"])
    whole = [tokenizer.encode(t, add_special_tokens=False).ids + [0] for t in (text, "short one")]
    assert lengths.tolist() == [len(w) for w in whole]
    assert tokens.tolist() == whole[0] + whole[1]


def test_tokenizers_that_add_a_prefix_are_encoded_whole():
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not encoding.can_cut(json.loads(metaspace.to_str()))
    no_pre_tokenizer = Tokenizer(models.BPE())
    assert not encoding.can_cut(json.loads(no_pre_tokenizer.to_str()))


MEASURE = """
import os, resource, sys
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: the peak is the encoding's, not the thread pool's
import webdataset  # imports torch; imported later (by the first shard) it would reuse, and hide, what encoding freed
from lit_overtok.data import encoding
from lit_overtok.data.prepare import PrepareConfig, prepare
encoding.LONG_DOCUMENT_CHARS, encoding.PIECE_CHARS = 1 << 13, 1 << 11  # pieces from 8 kB: small documents suffice
prepare(PrepareConfig(output=sys.argv[2], train=[sys.argv[1]], tokenizer=sys.argv[3], workers=1, progress=False))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_peak_memory_does_not_grow_with_the_document(tmp_path, text_tokenizer):
    runs = {}
    for megabytes in (0.05, 1.2):  # each in a fresh interpreter (the two side by side): its peak is this document's
        text = tmp_path / f"book{megabytes}.txt"  # one document (--text-unit file)
        text.write_text(((TRICKY + "Plain English prose follows here. ") * 8000)[: int(megabytes * 1e6)])
        runs[megabytes] = subprocess.Popen(
            [sys.executable, "-c", MEASURE, str(text), str(tmp_path / f"out{megabytes}"),
             str(text_tokenizer)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    peaks = {}
    for megabytes, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-2000:]
        peaks[megabytes] = int(stdout.split()[-1])
    # Whole-document encoding grows by ~175 MB per MB of text (here about +160 MB); pieces keep ids only.
    assert peaks[1.2] - peaks[0.05] < 40, peaks


# -------------------------------------------------------------------------------------------- resuming
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, text_tokenizer) -> tuple[Path, dict[str, bytes]]:
    """A corpus and the files an uninterrupted ``prepare`` writes for it."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    train = corpus(folder)
    prepare(config(folder, "reference", train, text_tokenizer))
    reference = files(folder / "reference")
    assert len([f for f in reference if f.startswith("train-")]) >= 6
    return train, reference


@pytest.mark.parametrize("fault", ["ctrl-c", "full disk"])
def test_an_interrupted_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, monkeypatch, fault, uninterrupted,
                                                                         text_tokenizer):
    train, reference = uninterrupted

    error = KeyboardInterrupt() if fault == "ctrl-c" else OSError(errno.ENOSPC, "No space left on device")
    fail_on_shard(monkeypatch, 4, error)
    if fault == "ctrl-c":
        with pytest.raises(KeyboardInterrupt):
            prepare(config(tmp_path, "run", train, text_tokenizer))
    else:
        with pytest.raises(PrepareError, match=r"writing .*train-000003.tar failed \(No space left on device\); "
                                               r"the 3 train shards before it are complete.*--resume"):
            prepare(config(tmp_path, "run", train, text_tokenizer))
    left = files(tmp_path / "run")
    assert "manifest.json" not in left and PROGRESS_NAME in left
    assert [n for n in left if n.endswith(".tar")] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with pytest.raises(PrepareError, match="an interrupted run: continue it with --resume"):
        prepare(config(tmp_path, "run", train, text_tokenizer))

    monkeypatch.undo()
    prepare(config(tmp_path, "run", train, text_tokenizer, resume=True, workers=2))
    assert files(tmp_path / "run") == reference


def test_a_sigkilled_run_resumes_to_the_same_bytes_and_a_changed_command_is_refused(tmp_path, uninterrupted,
                                                                                    text_tokenizer):
    train, reference = uninterrupted
    script = ("import os, signal, sys\n"
              "from lit_overtok.data import shards\n"
              "from lit_overtok.data.prepare import main\n"
              "write, calls = shards.write_shard, []\n"
              "def dying(path, documents, first_document):\n"
              "    calls.append(path)\n"
              "    if len(calls) == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return write(path, documents, first_document)\n"
              "shards.write_shard = dying\n"
              "main(sys.argv[1:])\n")
    command = ["--output", str(tmp_path / "run"), "--train", str(train), "--validation", str(train), "--tokenizer",
               str(text_tokenizer), "--shard-tokens", "700", "--workers", "1", "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", script, *command], cwd=ROOT, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert killed.returncode == -signal.SIGKILL

    with pytest.raises(PrepareError, match="--resume: .* was prepared with other shard_tokens"):
        main([*command[:-5], "--shard-tokens", "900", "--workers", "1", "--no-progress", "--resume"])
    main([*command, "--resume"])
    assert files(tmp_path / "run") == reference
    with pytest.raises(PrepareError, match="a finished run \\(manifest.json\\), nothing to resume"):
        main([*command, "--resume"])


def test_the_manifest_records_each_shards_largest_id(tmp_path, text_tokenizer):
    prepare(config(tmp_path, "out", corpus(tmp_path, 10), text_tokenizer))
    manifest = shards.Manifest.load(tmp_path / "out" / "manifest.json")
    for info in manifest.splits["train"]:
        documents = shards.read_shard(str(tmp_path / "out" / info.file), info, manifest.dtype, manifest.vocab_size)
        assert info.max_id == max(int(np.max(d)) for d in documents)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the kernel's parent-death signal")
def test_a_prepare_killed_by_sigkill_takes_its_workers_and_resource_tracker_with_it(tmp_path, text_tokenizer):
    import time

    train = corpus(tmp_path, 6000)
    command = ["--output", str(tmp_path / "run"), "--train", str(train), "--tokenizer",
               str(text_tokenizer), "--shard-tokens", "100000", "--workers", "2", "--no-progress"]
    prepare_process = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom lit_overtok.data.prepare import main\nmain(sys.argv[1:])", *command],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(children := children_of(prepare_process.pid)) < 3 and prepare_process.poll() is None:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    assert prepare_process.poll() is None, "prepare finished before it could be killed: give it more text"
    prepare_process.kill()
    prepare_process.wait()
    deadline = time.monotonic() + 30
    while any(alive(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [child for child in children if alive(child)]
    for child in left:  # do not leave them running whatever the outcome
        os.kill(child, signal.SIGKILL)
    assert left == [], f"still running after their parent's SIGKILL: {left} of {children}"
