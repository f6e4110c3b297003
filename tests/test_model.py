"""The plain data types: values that compare, hash and refuse changes like frozen dataclasses."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import datetime

import pytest

from reconcile.model import (
    BidsAddress,
    Experiment,
    FileStat,
    OutputRecord,
    ScanRecord,
    SessionKey,
    SessionRecord,
    natural_key,
)
from reconcile.plan import Action, Change, Reason

FAST_INIT = [Experiment, Change, SessionRecord, OutputRecord, ScanRecord]


@pytest.mark.parametrize("cls", FAST_INIT)
def test_hand_written_init_takes_exactly_the_fields_with_their_defaults(cls):
    # These classes fill their instance dict in one step instead of the generated __init__;
    # a field added to the class must be added to __init__ too.
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    required = {p.name: f"<{p.name}>" for p in params if p.default is inspect.Parameter.empty}
    made = cls(**required)
    for f in fields:
        if f.name in required:
            assert getattr(made, f.name) == required[f.name]
        else:
            expected = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert getattr(made, f.name) == expected, f.name
    assert {f.name for f in fields} == set(vars(made))


def test_a_default_dict_is_not_shared_between_records():
    a, b = (SessionRecord(*"abcdefghijklm") for _ in range(2))
    assert a.tools == {} and a.tools is not b.tools and a.config_digests is not b.config_digests


def test_experiment_is_a_frozen_hashable_value():
    stamp = datetime(2024, 1, 10, 14, 22, 5)
    a = Experiment("XNAT_E1", "S1_MR1", "P", "XNAT_S1", "S1", "2024-01-10", stamp, stamp)
    b = Experiment(id="XNAT_E1", label="S1_MR1", project="P", subject_id="XNAT_S1", subject_label="S1",
                   date="2024-01-10", insert_date=stamp, last_modified=stamp, xsi_type="xnat:mrSessionData")
    assert a == b and hash(a) == hash(b) and a.key == SessionKey("P", "XNAT_E1")
    assert dataclasses.replace(a, label="S1_MR2").label == "S1_MR2" and a.label == "S1_MR1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.label = "other"  # type: ignore[misc]


def test_change_is_a_frozen_value():
    change = Change(Action.CREATE, SessionKey("P", "E1"), BidsAddress("S1", "MR1"), (Reason("new", "new in XNAT"),))
    assert change == Change(action=Action.CREATE, key=SessionKey("P", "E1"), address=BidsAddress("S1", "MR1"),
                            reasons=(Reason("new", "new in XNAT"),), before=None, after=None, scans=None)
    assert hash(change) == hash(dataclasses.replace(change))
    with pytest.raises(dataclasses.FrozenInstanceError):
        change.action = Action.UPDATE  # type: ignore[misc]


def test_keys_addresses_and_stats_are_tuples_that_print_as_paths():
    assert str(SessionKey("P", "E1")) == "P/E1" and f"{BidsAddress('01', 'a')}" == "sub-01/ses-a"
    assert sorted([BidsAddress("02", "a"), BidsAddress("01", "b"), BidsAddress("01", "a")]) == [
        BidsAddress("01", "a"), BidsAddress("01", "b"), BidsAddress("02", "a")]
    assert FileStat(size=3, mtime_ns=4).size == 3


def test_natural_key_orders_scan_ids_by_their_numbers_and_takes_any_text():
    ids = ["SCOUT", "10", "1a", "2", "1.2", "1-MR10", "1-MR2", "01", "1", "3²", "3"]
    assert sorted(ids, key=natural_key) == ["01", "1", "1-MR2", "1-MR10", "1.2", "1a", "2", "3", "3²", "10", "SCOUT"]
