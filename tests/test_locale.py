"""The CLI under a locale that is not UTF-8: ASCII stand-ins on the console, UTF-8 in its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from worlds import add, redate, write_config

import reconcile
from reconcile.console import tolerate_locale


def _xnat2bids(args: list[str], emulator, tmp_path: Path, encoding: str, *, stdin_tty: bool = False) -> tuple[int, str, str]:
    """The CLI in a process of its own whose locale is C (ASCII) and whose console is `encoding`, as
    on an older cluster (LANG=en_US.ISO-8859-1). Output is read back as bytes: what a terminal gets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XNAT_", "NETRC", "LC_", "LANG", "PYTHONUTF8"))}
    env.update(XNAT_HOST=emulator.url, XNAT_USER=emulator.user, XNAT_PASS=emulator.password, HOME=str(tmp_path),
               XNAT2BIDS_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(Path(reconcile.__file__).parent.parent),
               LANG="C", LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONIOENCODING=encoding)
    done = subprocess.run([sys.executable, "-m", "reconcile", *args], env=env, cwd=tmp_path, capture_output=True,
                          timeout=300)
    out, err = done.stdout.decode("ascii" if encoding == "ascii" else "latin-1"), done.stderr.decode(encoding)
    assert "internal error" not in err, err
    return done.returncode, out, err


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_apply_plan_and_history_print_ascii_stand_ins_under_a_locale_that_is_not_utf8(emulator, tmp_path, encoding):
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    code, out, err = _xnat2bids(["apply", str(root), "-p", "PROJ", "--yes"], emulator, tmp_path, encoding)
    assert code == 0, out + err
    assert "  ... create sub-01/ses-01MR1 (PROJ/" in out  # was: UnicodeEncodeError on "…", exit 1
    assert "[1/1] ok create sub-01/ses-01MR1 (PROJ/" in out and "Apply complete: 1 done" in out
    assert (root / "sub-01" / "ses-01MR1").is_dir()

    redate(emulator, exps["01_MR1"], "2024-02-01")
    code, out, err = _xnat2bids(["plan", str(root), "-p", "PROJ", "--detailed-exitcode"], emulator, tmp_path, encoding)
    assert code == 2, out + err
    assert "date 2024-01-10 -> 2024-02-01 (re-dated in XNAT)" in out

    code, out, err = _xnat2bids(["history", str(root)], emulator, tmp_path, encoding)
    assert code == 0, out + err
    assert "1 done, 0 failed, 0 skipped; serial 0 -> 1" in out

    code, out, err = _xnat2bids(["plan", str(root), "-p", "PROJ", "--json"], emulator, tmp_path, encoding)
    assert code == 0, out + err
    assert [c["action"] for c in json.loads(out)["changes"]] == ["update"]


def test_an_accented_label_is_escaped_on_an_ascii_console_and_written_as_utf8_to_the_files(emulator, tmp_path):
    add(emulator.archive, [("01", "01_Müller", "2024-01-10")])
    write_config(tmp_path, 'projects = ["PROJ"]\n[naming]\nsessions = { "01_Müller" = "mr1" }')
    root = tmp_path / "bids"
    code, out, err = _xnat2bids(["plan", str(root), "--json"], emulator, tmp_path, "ascii")
    assert code == 0 and json.loads(out)["changes"][0]["after"]["label"] == "01_Müller", out + err
    code, out, err = _xnat2bids(["apply", str(root), "--yes"], emulator, tmp_path, "ascii")
    assert code == 0, out + err  # was: UnicodeEncodeError writing the label to the session's log
    assert "[1/1] ok create sub-01/ses-mr1" in out
    logs = "".join(p.read_text(encoding="utf-8") for p in (root / ".xnat2bids" / "logs").rglob("*.log"))
    assert "(01_Müller)" in logs


def test_symbols_become_ascii_and_other_characters_escapes_on_a_stream_that_cannot_encode_them(tmp_path):
    with open(tmp_path / "out", "w", encoding="ascii") as stream:
        tolerate_locale(stream)
        stream.write("[1/2] ✓ … 2 → 3 ≤ 4 × 5 — Müller \udcc3\udcbc\n")
    assert (tmp_path / "out").read_bytes() == b"[1/2] ok ... 2 -> 3 <= 4 x 5 -- M\\xfcller \xc3\xbc\n"
