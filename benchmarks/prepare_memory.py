"""Does ``prepare``'s memory grow with the size of one document? Peak RSS of ``prepare`` on a single plain-text
document of each size, with GPT-2's tokenizer and one process, each size in a fresh interpreter.

    python benchmarks/prepare_memory.py                  # 1, 4 and 17.5 MB documents (17.5 MB: the issue's case)
    python benchmarks/prepare_memory.py --quick          # 0.5 and 2 MB, under a minute on an idle 2-core machine
    python benchmarks/prepare_memory.py --whole --sizes 1 4   # the same documents encoded whole, as before the fix

The text is this repository's README repeated to the size (English prose with code and tables). Peak RSS is the
process's ``ru_maxrss``; it includes the interpreter and libraries, so the figure to read is the growth from the
smallest document (torch, which writing shards imports, is imported first, so that it cannot reuse memory the
encoding freed and hide the encoding's peak). The last line is one JSON object: peak MB and seconds per size, and ``growth_mb_per_text_mb``
between the smallest and the largest document.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lit_overtok.data.locations import data_dir  # noqa: E402

MEASURE = """
import resource, sys, time
import webdataset
from lit_overtok.data import encoding
from lit_overtok.data.prepare import PrepareConfig, prepare
if sys.argv[4] == "whole":
    encoding.LONG_DOCUMENT_CHARS = 1 << 60
started = time.perf_counter()
prepare(PrepareConfig(output=sys.argv[2], train=[sys.argv[1]], tokenizer=sys.argv[3], workers=1, progress=False))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - started)
"""


def measure(megabytes: float, folder: Path, whole: bool) -> dict[str, float]:
    text = (REPO / "README.md").read_text()
    document = folder / f"document_{megabytes}.txt"
    document.write_text((text * (int(megabytes * 1e6) // len(text) + 1))[: int(megabytes * 1e6)])
    gpt2 = data_dir(needed_for="the GPT-2 tokenizer") / "tokenizers/gpt2/tokenizer.json"
    done = subprocess.run([sys.executable, "-c", MEASURE, str(document), str(folder / f"out_{megabytes}"), str(gpt2),
                           "whole" if whole else "pieces"],
                          capture_output=True, text=True, check=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    peak_mb, seconds = map(float, done.stdout.split()[-2:])
    return {"text_mb": megabytes, "peak_rss_mb": round(peak_mb, 1), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.5 and 2 MB documents")
    parser.add_argument("--sizes", type=float, nargs="+", help="document sizes in MB")
    parser.add_argument("--whole", action="store_true", help="encode each document whole (the behaviour before pieces)")
    args = parser.parse_args()
    sizes = args.sizes or ([0.5, 2.0] if args.quick else [1.0, 4.0, 17.5])
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(size, Path(folder), args.whole) for size in sizes]
    for row in rows:
        print(f"{row['text_mb']:>6.1f} MB document: peak RSS {row['peak_rss_mb']:>7.1f} MB, {row['seconds']:.1f} s",
              file=sys.stderr)
    first, last = rows[0], rows[-1]
    growth = (last["peak_rss_mb"] - first["peak_rss_mb"]) / (last["text_mb"] - first["text_mb"])
    print(json.dumps({"encoding": "whole" if args.whole else "pieces", "sizes": rows,
                      "growth_mb_per_text_mb": round(growth, 2)}))


if __name__ == "__main__":
    main()
