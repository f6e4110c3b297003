"""XNAT labels to BIDS labels: unsafe labels are refused with their reason, others keep [A-Za-z0-9]."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconcile.config import NamingSettings
from reconcile.errors import UnsafePathError
from reconcile.model import BidsAddress, Experiment
from reconcile.naming import MAX_LABEL, address_for, bids_label, check_safe


@pytest.mark.parametrize(
    ("label", "reason"),
    [
        ("", "is empty"),
        (".", "contains '..'"),
        ("..", "contains '..'"),
        ("a..b", "contains '..'"),
        ("a/b", "contains a path separator"),
        ("a\\b", "contains a path separator"),
        ("tab\there", "contains control characters"),
        ("del\x7f", "contains control characters"),
        ("../x\x00", "contains control characters"),  # the first rule that applies names it
        ("A" * (MAX_LABEL + 1), f"is longer than {MAX_LABEL} characters"),
        ("A_" * MAX_LABEL, f"is longer than {MAX_LABEL} characters"),
    ],
)
def test_unsafe_label_is_refused_with_its_reason(label, reason):
    with pytest.raises(UnsafePathError, match=re.escape(reason)):
        bids_label(label, "session")


@pytest.mark.parametrize(
    ("label", "expected"),
    [("SUBJ01", "SUBJ01"), ("SUBJ01_MR1", "SUBJ01MR1"), ("a.b-c d", "abcd"), ("Jürgen", "Jrgen"), ("A" * MAX_LABEL, "A" * MAX_LABEL)],
)
def test_safe_label_keeps_only_ascii_letters_and_digits(label, expected):
    assert bids_label(label, "subject") == expected


def test_label_without_ascii_letters_or_digits_is_refused():
    with pytest.raises(UnsafePathError, match="has no letters or digits"):
        bids_label("日本", "subject")


def _refused_by_the_rules(label: str) -> bool:
    return (
        label == ""
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in label)
        or "/" in label
        or "\\" in label
        or label == "."
        or ".." in label
        or len(label) > MAX_LABEL
        or not re.sub(r"[^A-Za-z0-9]", "", label)
    )


@given(st.text(alphabet=st.sampled_from("aZ09_.-/\\ \x00\x1f\x7fé"), max_size=MAX_LABEL + 3))
def test_bids_label_follows_the_rules_for_any_label(label):
    if _refused_by_the_rules(label):
        with pytest.raises(UnsafePathError):
            bids_label(label, "session")
    else:
        check_safe(label, "session")
        assert bids_label(label, "session") == re.sub(r"[^A-Za-z0-9]", "", label)


def _exp(label: str, subject: str = "SUBJ01", eid: str = "XNAT_E00001") -> Experiment:
    return Experiment(eid, label, "PROJ", "XNAT_S00001", subject, None, None, None)


@pytest.mark.parametrize(
    ("naming", "label", "expected"),
    [
        (NamingSettings(), "SUBJ01_MR1", ("SUBJ01", "SUBJ01MR1")),
        (NamingSettings(session_label="strip-subject"), "SUBJ01_MR1", ("SUBJ01", "MR1")),
        (NamingSettings(session_label="strip-subject"), "OTHER_MR1", ("SUBJ01", "OTHERMR1")),
        (NamingSettings(session_label="strip-subject"), "SUBJ01_", ("SUBJ01", "SUBJ01")),
        (NamingSettings(subjects={"SUBJ01": "001"}, sessions={"XNAT_E00001": "base_line"}), "x", ("001", "baseline")),
        (NamingSettings(sessions={"SUBJ01_MR1": "a"}), "SUBJ01_MR1", ("SUBJ01", "a")),
    ],
)
def test_address_follows_the_naming_settings(naming, label, expected):
    assert address_for(_exp(label), naming) == BidsAddress(*expected)


@pytest.mark.parametrize(
    ("naming", "label", "reason"),
    [
        (NamingSettings(), "SUBJ01_.", None),  # safe as a whole, and has letters
        (NamingSettings(session_label="strip-subject"), "SUBJ01_.", "contains '..'"),  # "." once stripped
        (NamingSettings(session_label="strip-subject"), "SUBJ01_-", "has no letters or digits"),
        (NamingSettings(session_label="strip-subject"), "../SUBJ01_MR1", "contains a path separator"),
    ],
)
def test_session_label_is_checked_before_and_after_stripping_the_subject(naming, label, reason):
    if reason is None:
        assert address_for(_exp(label), naming).session == "SUBJ01"
    else:
        with pytest.raises(UnsafePathError, match=re.escape(reason)):
            address_for(_exp(label), naming)


@pytest.mark.parametrize(
    ("naming", "reason", "hint"),
    [
        (NamingSettings(subjects={"SUBJ01": "a/b"}), "contains a path separator", "'SUBJ01' in [naming] subjects"),
        (NamingSettings(subjects={"SUBJ01": "-_-"}), "has no letters or digits", "'SUBJ01' in [naming] subjects"),
        (NamingSettings(sessions={"XNAT_E00001": ".."}), "contains '..'", "'XNAT_E00001' in [naming] sessions"),
        (NamingSettings(sessions={"SUBJ01_MR1": ""}), "is empty", "'SUBJ01_MR1' in [naming] sessions"),
    ],
)
def test_bad_label_from_the_config_map_says_to_fix_the_map(naming, reason, hint):
    with pytest.raises(UnsafePathError) as info:
        address_for(_exp("SUBJ01_MR1"), naming)
    assert reason in info.value.summary
    assert info.value.hint is not None and info.value.hint.startswith("fix the value for ") and hint in info.value.hint
    assert "rename it in XNAT" not in info.value.hint


@pytest.mark.parametrize(("subject", "hint"), [("a/b", "rename it in XNAT"), ("-_-", "map it in [naming]")])
def test_bad_label_from_xnat_says_to_rename_or_map_it(subject, hint):
    with pytest.raises(UnsafePathError) as info:
        address_for(_exp("MR1", subject=subject), NamingSettings())
    assert info.value.hint is not None and hint in info.value.hint


def test_labels_too_long_together_for_a_bids_file_name_are_refused_before_any_download():
    # Each fits alone; `sub-<100>_ses-<100>_task-…_bold.json` does not fit in 255 bytes.
    with pytest.raises(UnsafePathError, match="are 200 characters together") as info:
        address_for(_exp("B" * 100, subject="A" * 100), NamingSettings())
    assert "[naming] subjects or sessions" in (info.value.hint or "")
    assert address_for(_exp("B" * 70, subject="A" * 70), NamingSettings()) == BidsAddress("A" * 70, "B" * 70)
    mapped = NamingSettings(subjects={"A" * 100: "S1"})
    assert address_for(_exp("B" * 100, subject="A" * 100), mapped) == BidsAddress("S1", "B" * 100)
