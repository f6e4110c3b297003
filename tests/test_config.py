"""The config file: every documented key parses, mistakes are clear errors, the root resolves."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconcile.config import DEFAULT_BIDS_ROOT, Config, load_config, parse_config
from reconcile.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "xnat2bids.toml.example"


def test_example_config_documents_every_key_and_parses():
    config = load_config(EXAMPLE)
    assert config.projects == ("PI_STUDY",)
    assert config.slurm.max_parallel == 8 and config.slurm.extra_args == ("--mail-type=FAIL",)
    assert config.conversion_for("PI_STUDY", "0001_MR1").include == ("1-4,6",)
    from reconcile.schema import load_schema

    documented = EXAMPLE.read_text()
    for key in load_schema("config")["properties"]:
        assert f"{key} =" in documented or f"[{key}" in documented, key


@pytest.mark.parametrize(
    "text, message",
    [
        ('projets = ["A"]', "unknown key 'projets' (did you mean 'projects'?)"),
        ("[conversion]\nskp = []", "unknown key 'conversion.skp' (did you mean 'skip'?)"),
        ("[slurm]\nmax_paralel = 2", "unknown key 'slurm.max_paralel' (did you mean 'max_parallel'?)"),
        ("[project.P.conversion]\nincude = []", "unknown key 'project.P.conversion.incude' (did you mean 'include'?)"),
        ('jobs = "four"', "invalid value for 'jobs'"),
        ("jobs = 0", "invalid value for 'jobs'"),
        ('layout = "nested"', "invalid value for 'layout'"),
        ('xnat_url = "xnat.example.org"', "invalid value for 'xnat_url'"),
        ("[naming]\nsubjects = { A = 3 }", "invalid value for 'naming.subjects.A'"),
        ("projects = [", "is not valid TOML"),
    ],
)
def test_config_mistakes_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "x.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert message in str(exc.value)


def test_unreadable_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "binary.toml")


def test_bids_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Config().resolve_bids_root(None) == tmp_path / DEFAULT_BIDS_ROOT.removeprefix("~/")
    configured = parse_config({"bids_root": "~/elsewhere"})
    assert configured.resolve_bids_root(None) == tmp_path / "elsewhere"
    assert configured.resolve_bids_root(tmp_path / "arg") == tmp_path / "arg"


def test_relative_custom_heuristic_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "x.toml"
    path.write_text('[conversion]\nheuristic = "heuristics/lab.py"\n[project.P.conversion]\nheuristic = "other.py"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.conversion.heuristic == str(tmp_path / "cfg/heuristics/lab.py")
    assert config.conversion_for("P", "S").heuristic == str(tmp_path / "cfg/other.py")
    assert config.conversion_for("Q", "S").heuristic == str(tmp_path / "cfg/heuristics/lab.py")


def test_editing_a_custom_heuristic_changes_its_digest_moving_the_config_does_not(tmp_path):
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "lab.py").write_text("def infotodict(seqinfo):\n    return {}\n")
        (tmp_path / where / "x.toml").write_text('[conversion]\nheuristic = "lab.py"\n')
    a = load_config(tmp_path / "a/x.toml").conversion_for("P", "S").digests()["heuristic"]
    b = load_config(tmp_path / "b/x.toml").conversion_for("P", "S").digests()["heuristic"]
    assert a == b
    (tmp_path / "a/lab.py").write_text("def infotodict(seqinfo):\n    return {'changed': 1}\n")
    assert load_config(tmp_path / "a/x.toml").conversion_for("P", "S").digests()["heuristic"] != a
