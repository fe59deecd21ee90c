"""Property tests for perlhf.data: hypothesis writes files mixing valid records with every kind of bad input.

The record generator lives in benchmarks/fuzz_data.py (which runs it at scale); here hypothesis picks the
format, the container and the sequence of record kinds, and a seed for the text inside each record.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz_data  # noqa: E402
from perlhf.data import DataError, load_preferences, load_prompts  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def fuzz_files(draw):
    fmt = draw(st.sampled_from(fuzz_data.FORMATS))
    container = draw(st.sampled_from(fuzz_data.CONTAINERS))
    # text inside records comes from a seeded Random: hypothesis shrinks the structure, not every character
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    bad_kinds = [kind for kind in fuzz_data.kinds_for(fmt, container) if kind != "too_long"]
    # half valid, half broken in some way; a megabyte record in one file of five
    kinds = draw(st.lists(st.one_of(st.just("valid"), st.sampled_from(bad_kinds)), max_size=12))
    if draw(st.integers(0, 4)) == 0:
        kinds.insert(draw(st.integers(0, len(kinds))), "too_long")
    columns = fuzz_data.file_columns(fmt, rng)
    cases = [fuzz_data.make_case(fmt, name, container, columns, rng) for name in kinds]
    return fmt, container, columns, cases


@FUZZ
@given(fuzz_files())
def test_every_record_is_kept_or_counted_with_the_right_reason(spec):
    fmt, container, columns, cases = spec
    with tempfile.TemporaryDirectory() as tmp:
        outcome = fuzz_data.check_file(Path(tmp), "fuzz", fmt, container, cases, columns)
    # check_file turns every broken promise into a message: crashes, DataError on a file with valid records,
    # records lost, total != kept + skipped, a valid record skipped, a bad one kept, a wrong reason or value.
    assert outcome.problems == []
    if outcome.refused_files:
        assert not any(case.expected == "kept" for case in cases)
    else:
        assert outcome.kept + sum(outcome.skipped.values()) == len(cases)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["jsonl", "json", "csv", "txt"]))
def test_arbitrary_bytes_never_crash_and_never_lose_lines(blob, extension):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"junk.{extension}"
        path.write_bytes(blob)
        rejects = Path(tmp) / "rejects.jsonl"
        loaders = [lambda: load_prompts(str(path), rejects_path=rejects)]
        if extension != "txt":
            loaders.append(lambda: load_preferences(str(path), rejects_path=rejects))
        for load in loaders:
            try:
                kept, report = load()
            except DataError:
                continue
            assert report.total == report.kept + sum(report.skipped.values()) == len(kept) + \
                len(rejects.read_text(encoding="utf-8").splitlines())
            if extension in ("jsonl", "txt"):
                # one record per non-blank line, whatever the bytes
                text = blob.removeprefix(b"\xef\xbb\xbf")
                lines = [line for line in text.split(b"\n") if line.decode("utf-8", "replace").strip()]
                assert report.total == len(lines)


def test_the_checker_notices_a_wrong_expectation(tmp_path):
    """The fuzz oracle itself can fail: a valid record expected to be skipped is reported as misjudged."""
    rng = random.Random(0)
    cases = [fuzz_data.make_case("explicit", "valid", "jsonl", None, rng) for _ in range(3)]
    cases[1].expected = "empty chosen"
    outcome = fuzz_data.check_file(tmp_path, "oracle", "explicit", "jsonl", cases, None)
    assert len(outcome.misjudged) == 1 and "expected 'empty chosen'" in outcome.misjudged[0]
    cases[1].expected, cases[2].output = "kept", ("pair", "wrong", "values", "here")
    outcome = fuzz_data.check_file(tmp_path, "oracle2", "explicit", "jsonl", cases, None)
    assert len(outcome.misjudged) == 1 and "parsed" in outcome.misjudged[0]


def test_benchmark_run_is_clean_on_a_small_sample():
    outcome = fuzz_data.run(records=600, seed=3)
    assert outcome.records == 600 and outcome.problems == []
    assert outcome.kept + sum(outcome.skipped.values()) + outcome.refused_records == 600


@pytest.mark.parametrize("fmt", fuzz_data.FORMATS)
def test_each_format_kind_produces_its_reason(tmp_path, fmt):
    """Every generator kind, once per format, in one file: each record gets exactly the intended fate."""
    rng = random.Random(fuzz_data.FORMATS.index(fmt))
    columns = fuzz_data.file_columns(fmt, rng)
    kinds = ["valid"] + [kind for kind in fuzz_data.kinds_for(fmt, "jsonl") if kind != "too_long"]
    cases = [fuzz_data.make_case(fmt, kind, "jsonl", columns, rng) for kind in kinds for _ in range(2)]
    outcome = fuzz_data.check_file(tmp_path, fmt, fmt, "jsonl", cases, columns)
    assert outcome.problems == []
    assert outcome.kept == sum(case.expected == "kept" for case in cases)
    rejects = [json.loads(line) for line in (tmp_path / f"{fmt}.rejects.jsonl").read_text().splitlines()]
    assert {row["reason"] for row in rejects} == {case.expected for case in cases if case.expected != "kept"}
