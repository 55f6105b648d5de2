"""Studies name the commit and CPU they ran on (issue 20 item 7): lit_overtok.studies.provenance."""

import subprocess

from lit_overtok.studies import provenance
from lit_overtok.studies.convergence import REACHED, Speedup, format_ratio


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_commit_of_a_checkout_says_when_tracked_files_differ_from_it(tmp_path):
    assert provenance.commit(tmp_path) is None  # not a git checkout
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "runs.log").write_text("untracked outputs do not make a checkout dirty\n")
    assert provenance.commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("two\n")
    assert provenance.commit(tmp_path) == head + "+dirty"


def test_the_cpu_is_named_with_the_flags_that_change_timings(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n"
                       "\nprocessor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n")
    assert provenance.cpu(cpuinfo) == {"model": "AMD EPYC 9B14", "flags": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    here = provenance.cpu()
    assert here["model"] and isinstance(here["flags"], list)


def test_a_reports_line_lists_every_commit_and_cpu_and_counts_attempts_that_recorded_neither():
    epyc = {"model": "EPYC", "flags": ["avx2", "fma"]}
    records = [{"commit": "a" * 40, "cpu": epyc}, {"commit": "b" * 40 + "+dirty", "cpu": epyc}, {"cpu_seconds": 3.0}]
    assert provenance.describe(records) == ("commit aaaaaaaaaaaa, bbbbbbbbbbbb+dirty; CPU EPYC (avx2, fma); "
                                            "1 attempt(s) ran before the sweep recorded either")
    assert provenance.describe([{"cpu_seconds": 3.0}]) == "commit not recorded; CPU not recorded"


def test_an_interval_end_where_draws_never_cross_reads_never_not_zero():
    assert format_ratio(0.0) == "never" and format_ratio(float("inf")) == "∞" and format_ratio(1.234) == "1.23x"
    result = Speedup("val/loss", True, 0.25, 6.6, 1e6, REACHED, 8e5, 6.5, 1.25, low=0.0, high=3.4)
    assert result.text() == "1.25x [never, 3.40x]"
