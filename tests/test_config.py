"""The config file: every documented key parses, mistakes are clear errors, the root resolves."""

from __future__ import annotations

import copy
import pickle
from dataclasses import replace
from pathlib import Path

import pytest

import reconcile.config as config_module
from reconcile.config import (
    DEFAULT_BIDS_ROOT,
    Config,
    ConversionSettings,
    load_config,
    parse_config,
)
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
        ('jobs = "four"', "invalid value for 'jobs': must be a whole number, not \"four\""),
        ("jobs = 0", "invalid value for 'jobs': must be at least 1, not 0"),
        ('layout = "nested"', "invalid value for 'layout': must be one of \"flat\", \"pi-study\", not \"nested\""),
        ('xnat_url = "xnat.example.org"', "invalid value for 'xnat_url'"),
        ("[naming]\nsubjects = { A = 3 }", "invalid value for 'naming.subjects.A': must be a string, not 3"),
        ("projects = [", "is not valid TOML"),
        ("timeout = 0", "invalid value for 'timeout': must be greater than 0, not 0"),
        ('timeout = "slow"', "invalid value for 'timeout': must be a number, not \"slow\""),
        ("timout = 60", "unknown key 'timout' (did you mean 'timeout'?)"),
    ],
)
def test_config_mistakes_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "x.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert message in str(exc.value)
    assert exc.value.hint == f"every key is in {config_module.EXAMPLE}" or "TOML" in message  # the installed one
    assert config_module.EXAMPLE.read_text() == EXAMPLE.read_text()


def test_timeout_is_read_and_does_not_change_the_fingerprint(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("timeout = 120\n")
    config = load_config(path)
    assert config.timeout == 120.0 and Config().timeout == 30.0
    assert config.fingerprint() == Config().fingerprint()  # how long to wait decides no output


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
    (tmp_path / "cfg" / "heuristics").mkdir(parents=True)
    for name in ("heuristics/lab.py", "other.py"):
        (tmp_path / "cfg" / name).write_text("def infotodict(seqinfo):\n    return {}\n")
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
    fingerprint = load_config(tmp_path / "a/x.toml").fingerprint()
    (tmp_path / "a/lab.py").write_text("def infotodict(seqinfo):\n    return {'changed': 1}\n")
    assert load_config(tmp_path / "a/x.toml").conversion_for("P", "S").digests()["heuristic"] != a
    # The config's fingerprint too: a saved plan, or a SLURM task, must not outlive the edit.
    assert load_config(tmp_path / "a/x.toml").fingerprint() != fingerprint
    (tmp_path / "plain.toml").write_text("")
    assert load_config(tmp_path / "plain.toml").fingerprint() == Config().fingerprint()


def test_bids_root_and_heuristic_paths_are_relative_to_the_config_file_and_expand_tilde(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "heur").mkdir(parents=True)
    (home / "heur" / "mine.py").write_text("def infotodict(seqinfo):\n    return {}\n")
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "x.toml"
    path.write_text('bids_root = "data/bids"\n[conversion]\nheuristic = "~/heur/mine.py"\n')
    monkeypatch.chdir(tmp_path)  # anywhere but the config's folder
    config = load_config(Path("cfg/x.toml"))
    assert config.resolve_bids_root(None) == tmp_path / "cfg/data/bids"
    assert config.conversion.heuristic == str(home / "heur/mine.py")
    assert config.conversion_for("P", "S").heuristic_sha


def test_a_heuristic_file_that_cannot_be_read_is_a_config_error(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('[project.P.sessions.S1]\nheuristic = "gone.py"\n')
    with pytest.raises(ConfigError, match=f"cannot read heuristic {tmp_path}/gone.py"):
        load_config(path)
    path.write_text('[conversion]\nheuristic = "convertall"\n')  # one of heudiconv's own, by name
    assert load_config(path).conversion.heuristic == "convertall"


@pytest.mark.parametrize("url", ["https://alice:S3cret@xnat.example.org", "htps://alice:S3cret@xnat.example.org",
                                 " https://alice:a/b@xnat.example.org"])
def test_credentials_in_xnat_url_are_refused_without_being_shown(tmp_path, url):
    path = tmp_path / "x.toml"
    path.write_text(f'xnat_url = "{url}"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    shown = f"{exc.value.summary} {exc.value.detail} {exc.value.hint}"
    assert "xnat_url holds a user name or password" in shown and "S3cret" not in shown and "a/b" not in shown


@pytest.mark.parametrize("where", ["[conversion]", "[project.P.conversion]", "[project.P.sessions.S1]"])
@pytest.mark.parametrize("target", ["anat-T1w_acq-../../x", "anat/T1w", "anat-T1w acq", "func\\\\bold",
                                    "anat-T1w_acq-mprage\u00fc", "anat-T1w_acq-0.8mm"])
def test_a_bidsmap_target_that_is_not_a_reprOin_name_is_refused(tmp_path, where, target):
    path = tmp_path / "x.toml"
    path.write_text(f'{where}\nbidsmap = {{ "MPRAGE*" = "{target}" }}\n')
    with pytest.raises(ConfigError, match="is not a ReproIn series name"):
        load_config(path)


def test_a_projects_table_is_taken_for_the_singular_project_table(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('[projects.LAB_STUDY.conversion]\nskip = ["*scout*"]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.summary == (f"{path}: 'projects' is the list of projects to export, not a table; "
                                 "did you mean [project.LAB_STUDY]?")


@pytest.mark.parametrize("text", ["project = 5", 'project = ["LAB"]', '[project.LAB]\nsessions = "x"',
                                  'xnat_url = ["https://bob:S3cret@xnat.example.org"]',
                                  'xnat_url = { url = "https://bob:S3cret@xnat.example.org" }'])
def test_values_of_the_wrong_shape_are_config_errors_that_never_echo_a_url(tmp_path, text):
    path = tmp_path / "x.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "invalid value for" in exc.value.summary and "S3cret" not in str(exc.value)


def test_a_config_reached_through_a_link_resolves_paths_from_its_own_folder(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "lab.py").write_text("def infotodict(seqinfo):\n    return {}\n")
    (tmp_path / "shared" / "lab.toml").write_text('bids_root = "bids"\n[conversion]\nheuristic = "lab.py"\n')
    (tmp_path / "me").mkdir()
    (tmp_path / "me" / "lab.toml").symlink_to(tmp_path / "shared" / "lab.toml")
    linked, real = load_config(tmp_path / "me" / "lab.toml"), load_config(tmp_path / "shared" / "lab.toml")
    assert linked.conversion.heuristic == real.conversion.heuristic == str(tmp_path / "shared" / "lab.py")
    assert linked.resolve_bids_root(None) == tmp_path / "shared" / "bids"
    assert linked.fingerprint() == real.fingerprint()


def test_conversion_settings_hash_as_they_compare_also_after_a_copy() -> None:
    # The hash is cached on first use; a copy (pickled for another process) must not carry it.
    a = ConversionSettings(skip=("*scout*",), bidsmap=(("t1", "anat-T1w"),))
    b = ConversionSettings(skip=("*scout*",), bidsmap=(("t1", "anat-T1w"),))
    assert hash(a) == hash(b) and a == b and a != replace(a, skip=())
    copied = pickle.loads(pickle.dumps(a))
    assert "_hash" not in copied.__dict__ and copied == a and hash(copied) == hash(a)
    assert copy.copy(a) == a and {a: 1}[b] == 1
