"""MD5 of many files at once: `_md5lanes` against hashlib, and the batching around it."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconcile import digest

# CI builds the extension (it installs a C compiler); elsewhere a missing build only skips.
needs_lanes = pytest.mark.skipif(
    not digest.lanes_available() and os.environ.get("CI") != "true",
    reason="reconcile._md5lanes was not built (no C compiler)",
)


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI promises a C compiler to build it")
def test_the_extension_is_built_where_ci_runs():
    assert digest.lanes_available()


@needs_lanes
@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_md5_many_equals_hashlib_for_any_buffers(buffers):
    assert digest.md5_many(buffers) == [hashlib.md5(b).digest() for b in buffers]


@needs_lanes
def test_md5_many_handles_every_padding_boundary_and_unequal_lengths():
    rng = random.Random(7)
    # 55/56 and 119/120 bytes: the length field fits in the last block, or needs one more.
    sizes = [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 121, 127, 128, 129, 4096, 100_003]
    sizes += [rng.randrange(0, 70_000) for _ in range(25)]  # lanes finish at different times and refill
    buffers = [rng.randbytes(n) for n in sizes]
    assert digest.md5_many(buffers) == [hashlib.md5(b).digest() for b in buffers]
    assert digest.md5_many([memoryview(buffers[-1])[3:], bytearray(b"abc")]) == [
        hashlib.md5(buffers[-1][3:]).digest(), hashlib.md5(b"abc").digest()]


@needs_lanes
def test_md5_many_refuses_what_is_not_a_buffer():
    with pytest.raises(TypeError):
        digest.md5_many([b"ok", "text"])
    with pytest.raises(TypeError):
        digest.md5_many(3)


@pytest.mark.parametrize("lanes", [True, False])
def test_md5_files_matches_hashlib_and_reports_unreadable_or_resized_files(tmp_path, monkeypatch, lanes):
    if not lanes:
        monkeypatch.setattr(digest, "md5_many", None)
    elif not digest.lanes_available():
        pytest.skip("reconcile._md5lanes was not built")
    monkeypatch.setattr(digest, "BATCH_BYTES", 1 << 16)  # several batches, and files bigger than one
    monkeypatch.setattr(digest, "MAP_MIN", 1 << 12)  # files from 4 KiB are mapped, smaller ones read
    rng = random.Random(3)
    paths, sizes, expected = [], [], []
    for i, n in enumerate([0, 10, 5000, 70_000, 30_000, 30_000, 30_000, 1, 65_536, 200_000]):
        data = rng.randbytes(n)
        path = tmp_path / f"f{i}"
        path.write_bytes(data)
        paths.append(path)
        sizes.append(n)
        expected.append(hashlib.md5(data).hexdigest())
    assert digest.md5_files(paths, sizes) == expected

    paths[2].unlink()
    paths[4].write_bytes(b"short")
    paths[6].write_bytes(paths[6].read_bytes() + b"grown")  # mapped size would match, file is longer
    paths[1].write_bytes(paths[1].read_bytes() + b"+")  # a small file that grew
    (tmp_path / "dir").mkdir()
    paths[5] = tmp_path / "dir"
    got = digest.md5_files(paths, sizes)
    changed = (1, 2, 4, 5, 6)
    assert [got[i] for i in changed] == [None] * len(changed)
    assert [g for i, g in enumerate(got) if i not in changed] == [e for i, e in enumerate(expected) if i not in changed]


def test_batches_stay_within_the_budget_and_keep_the_order(monkeypatch):
    monkeypatch.setattr(digest, "BATCH_BYTES", 100)
    assert digest.batches([40, 40, 40, 150, 10, 0, 90]) == [[0, 1], [2], [3], [4, 5, 6]]
