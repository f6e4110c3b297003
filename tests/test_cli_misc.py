"""The CLI's behaviour around its commands: Ctrl-C, unexpected errors, `history`, `status --json`."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from worlds import SMALL, add, assert_schema

import reconcile
from reconcile.apply import ApplyReport, append_history
from reconcile.config import Config
from reconcile.lock import Lock, read_lock
from reconcile.plan import LocalState, RemoteState, compute_plan

STATUS_KEYS = {
    "format_version", "batch", "bids_root", "created_at", "submitted_by", "array_job", "finalize_job",
    "finalize_state", "holds_state_lock", "finalized", "sessions", "holder", "pending_revocations",
}


def test_ctrl_c_during_plan_prints_one_line_and_exits_1(tmp_path):
    # A server that accepts the connection and never answers: plan blocks in its first request.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(60)
        env = {**os.environ, "XNAT_HOST": f"http://127.0.0.1:{server.getsockname()[1]}", "XNAT_USER": "u",
               "XNAT_PASS": "p", "HOME": str(tmp_path), "XNAT2BIDS_CACHE_DIR": str(tmp_path / "cache"),
               "PYTHONPATH": str(Path(reconcile.__file__).parent.parent)}  # the code under test
        proc = subprocess.Popen([sys.executable, "-m", "reconcile", "plan", str(tmp_path / "bids"), "-p", "PROJ"],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = server.accept()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            conn.close()
        finally:
            proc.kill()
    assert proc.returncode == 1, err
    assert err == "Interrupted.\n" and out == ""


def test_interrupt_inside_a_command_exits_1_not_130(cli, emulator, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("reconcile.observe.make_plan", interrupted)
    code, _, err = cli("plan", str(tmp_path), "-p", "PROJ")
    assert (code, err) == (1, "Interrupted.\n")


def test_unexpected_exception_is_one_line_unless_debug(cli, emulator, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("reconcile.observe.make_plan", broken)
    code, _, err = cli("plan", str(tmp_path), "-p", "PROJ")
    assert code == 1
    assert err.splitlines() == ["error: internal error: RuntimeError: boom",
                                "hint: run again with --debug for the traceback"]
    for argv in (("--debug", "plan", str(tmp_path), "-p", "PROJ"), ("plan", str(tmp_path), "-p", "PROJ", "--debug")):
        code, _, err = cli(*argv)
        assert code == 1
        assert err.startswith("Traceback (most recent call last):") and "RuntimeError: boom" in err
        assert err.splitlines()[-1] == "error: internal error: RuntimeError: boom"


def test_history_skips_lines_that_are_not_entries_with_a_warning_each(cli, tmp_path):
    root = tmp_path / "bids"
    plan = compute_plan(Lock.new(), RemoteState((), None), LocalState({}), Config())
    first = append_history(root, plan, ApplyReport(lock=Lock.new()))
    history = root / ".xnat2bids/history.jsonl"
    with open(history, "a") as fh:
        fh.write('{"time": "2024-01-01T00:00:00Z"}\n')  # valid JSON, not an entry (no summary)
        fh.write("[1, 2]\n")
        fh.write(json.dumps({**first, "sessions": [{"action": "create"}]}) + "\n")
        fh.write("{not json\n")
        fh.write(json.dumps({**first, "lock_serial": {"before": 0, "after": float("nan")}}) + "\n")
    append_history(root, plan, ApplyReport(lock=Lock.new()))
    code, out, err = cli("history", str(root))
    assert code == 0, err
    assert out.count(" apply by ") == 2 and "Traceback" not in out + err
    assert err.splitlines() == [
        f"warning: {history}: line 2 is not a complete history entry; skipped",
        f"warning: {history}: line 3 is not a complete history entry; skipped",
        f"warning: {history}: line 4 is not a complete history entry; skipped",
        f"warning: {history}: line 5 is not valid JSON; skipped",
        f"warning: {history}: line 6 is not valid JSON; skipped",
    ]
    code, out, _ = cli("history", str(root), "--json")
    assert code == 0 and [json.loads(line)["operation"] for line in out.splitlines()] == ["apply", "apply"]
    for line in out.splitlines():
        assert_schema("history", json.loads(line))


def test_json_outputs_of_a_dataset_with_nothing_yet_are_json(cli, tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    code, out, _ = cli("show", str(root), "--json")
    assert code == 0 and json.loads(out) == {"format_version": 1, "lineage": None, "serial": 0, "sessions": []}
    assert_schema("show", json.loads(out))
    code, out, _ = cli("history", str(root), "--json")
    assert (code, out) == (0, "")


@pytest.mark.parametrize("command", ["show", "history", "status", "check"])
def test_a_mistyped_root_is_an_error_not_an_empty_dataset(cli, tmp_path, command):
    root = tmp_path / "bisd"
    code, out, err = cli(command, str(root))
    assert code == 1 and out == ""
    assert err.startswith(f"error: BIDS root {root} does not exist\n")


def test_status_json_without_a_batch_is_json(cli, tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    code, out, _ = cli("status", str(root), "--json")
    assert code == 0
    doc = json.loads(out)
    assert_schema("status", doc)
    assert set(doc) == STATUS_KEYS
    assert doc["batch"] is None and doc["holder"] is None and doc["pending_revocations"] == []
    assert doc["bids_root"] == str(root) and doc["sessions"] == []
    code, out, _ = cli("status", str(root))
    assert code == 0 and out == f"No SLURM batch in {root}.\n"


def test_status_json_of_a_root_locked_by_another_apply_names_the_holder(cli, tmp_path):
    from reconcile import statelock

    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")
    try:
        code, out, _ = cli("status", str(root), "--json")
    finally:
        statelock.release(root, holder)
    assert code == 0
    doc = json.loads(out)
    assert_schema("status", doc)
    assert set(doc) == STATUS_KEYS and doc["batch"] is None
    assert doc["holder"]["id"] == holder.id and doc["holder"]["pid"] == os.getpid()
    assert doc["holder"]["operation"] == "apply"



def test_status_names_a_holder_killed_without_releasing_as_gone_and_plan_does_not_warn_of_it(cli, emulator, tmp_path):
    from reconcile import statelock

    root = tmp_path / "bids"
    root.mkdir()
    # An apply killed with SIGKILL: its lock file stays, naming a pid that no longer runs.
    script = ("import sys, time; from pathlib import Path; from reconcile import statelock; "
              "statelock.acquire(Path(sys.argv[1]), 'apply'); print('held', flush=True); time.sleep(60)")
    holding = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(reconcile.__file__).parent.parent)})
    assert holding.stdout.readline() == "held\n"
    holding.kill()
    holding.wait()
    holder = statelock.read_holder(root)
    assert holder.pid == holding.pid

    code, out, err = cli("status", str(root))
    assert code == 0, out + err
    assert out == (f"{root} is locked by a process that is gone (pid {holding.pid} is gone): {holder.describe()}\n"
                   f"  it ended without releasing the lock; the next `xnat2bids apply` takes it over, or run "
                   f"`xnat2bids force-unlock {holder.id} {root}`\n")  # was: "is locked: apply by ...", as if running
    code, out, _ = cli("status", str(root), "--json")
    doc = json.loads(out)
    assert_schema("status", doc)
    assert doc["holder"]["id"] == holder.id and doc["holder"]["gone"] == f"pid {holding.pid} is gone"
    code, out, err = cli("plan", str(root), "-p", "PROJ")
    assert code == 0 and "at work" not in err, out + err


def test_status_of_a_root_locked_by_a_running_apply_says_locked_not_gone(cli, tmp_path):
    from reconcile import statelock

    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")
    try:
        code, out, _ = cli("status", str(root))
        _, as_json, _ = cli("status", str(root), "--json")
    finally:
        statelock.release(root, holder)
    assert code == 0 and out == f"{root} is locked: {holder.describe()}\n"
    assert json.loads(as_json)["holder"]["gone"] is None


def test_config_given_before_the_command_is_the_one_used(cli, emulator, tmp_path):
    emulator.archive.add_session("PROJ", "01", "01_MR1", date="2024-01-10")
    config = tmp_path / "lab.toml"
    config.write_text(f'bids_root = "{tmp_path / "from-config"}"\nprojects = ["PROJ"]\n'
                      '[naming]\nsession_label = "strip-subject"\n')
    code, out, err = cli("--config", str(config), "plan")
    assert code == 0, out + err
    assert f"xnat2bids plan for {tmp_path / 'from-config'}" in out and "sub-01/ses-MR1" in out
    code, out, err = cli("-c", str(config), "plan", "-c", str(config))
    assert code == 0, out + err
    code, _, err = cli("-c", str(config), "plan", "-c", str(tmp_path / "other.toml"))
    assert code == 1 and "two config files given" in err
    code, _, err = cli("-c", str(tmp_path / "missing.toml"), "show")
    assert code == 1 and f"cannot read config {tmp_path / 'missing.toml'}" in err


def test_a_glob_in_the_configs_projects_selects_among_the_lock_and_config_ids(cli, emulator, tmp_path):
    config = tmp_path / "lab.toml"
    config.write_text('projects = ["DEM*"]\n')
    code, _, err = cli("plan", str(tmp_path / "bids"), "-c", str(config))
    assert code == 1 and ("project pattern 'DEM*' matches no project exported to this BIDS root (the config's "
                          "`projects` is a glob)") in err
    assert "hint: a glob in `projects` selects among the projects already exported here" in err
    assert not [p for m, p, _ in emulator.app.requests if "DEM*" in p or "DEM%2A" in p]


def _cli_process(args: list[str], emulator, tmp_path, *, credentials: bool = True, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XNAT_", "NETRC"))}
    env.update(XNAT_HOST=emulator.url, HOME=str(tmp_path), XNAT2BIDS_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(Path(reconcile.__file__).parent.parent))
    if credentials:
        env.update(XNAT_USER=emulator.user, XNAT_PASS=emulator.password)
    return subprocess.Popen([sys.executable, "-m", "reconcile", *args], env=env, cwd=tmp_path, text=True, **popen)


def test_commands_run_with_stdin_closed(emulator, tmp_path):
    emulator.archive.add_session("PROJ", "01", "01_MR1", date="2024-01-10")
    proc = _cli_process(["plan", str(tmp_path / "bids"), "-p", "PROJ", "--detailed-exitcode"], emulator, tmp_path,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(0))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    assert "+ create  sub-01/ses-01MR1" in out and "error" not in err


def test_the_credential_prompts_stay_off_stdout(emulator, tmp_path):
    import fcntl
    import pty
    import termios

    emulator.archive.add_session("PROJ", "01", "01_MR1", date="2024-01-10")
    master, slave = pty.openpty()

    def on_the_terminal() -> None:  # the pty becomes the child's controlling terminal, as a login's would
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = _cli_process(["plan", str(tmp_path / "bids"), "-p", "PROJ", "--json"], emulator, tmp_path,
                        credentials=False, stdin=slave, stderr=slave, stdout=subprocess.PIPE,
                        preexec_fn=on_the_terminal)
    os.close(slave)
    seen = b""
    try:
        for answer, prompt in ((emulator.user, b"XNAT user for 127.0.0.1: "), (emulator.password, b"Password for ")):
            deadline = time.monotonic() + 60
            while prompt not in seen:
                assert time.monotonic() < deadline, f"no {prompt!r} on the terminal; it shows {seen!r}"
                if select.select([master], [], [], 1)[0]:
                    seen += os.read(master, 1024)
            seen = seen.split(prompt, 1)[1]
            os.write(master, answer.encode() + b"\n")
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 0
    assert [c["address"] for c in json.loads(out)["changes"]] == ["sub-01/ses-01MR1"]


def test_a_root_that_is_missing_or_a_file_is_a_clear_error(cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for command in (("history",), ("status",), ("finalize",), ("check",), ("show",), ("forget", "XNAT_E00001")):
        code, _, err = cli(*command, str(afile))
        assert code == 1, command
        assert f"error: BIDS root {afile} is not a folder" in err or f"cannot read {afile}" in err, (command, err)
    code, _, err = cli("forget", "XNAT_E00001", str(tmp_path / "missing"))
    assert code == 1 and f"error: BIDS root {tmp_path / 'missing'} does not exist" in err
    assert not (tmp_path / "missing").exists()


def test_a_folder_where_the_state_lock_goes_is_named(cli, tmp_path):
    from reconcile.statelock import state_lock_path

    root = tmp_path / "bids"
    state_lock_path(root).mkdir(parents=True)
    for command in (("status", str(root)), ("forget", "XNAT_E00001", str(root)), ("force-unlock", "abc", str(root))):
        code, _, err = cli(*command)
        assert code == 1, command
        assert f"error: {state_lock_path(root)} is a folder, not xnat2bids' state lock" in err, (command, err)


def test_damaged_batch_manifests_are_skipped(cli, tmp_path):
    root = tmp_path / "bids"
    for name, content in (("list", "[]"), ("text", "not json"), ("partial", '{"id": "partial"}')):
        (root / ".xnat2bids/batches" / name).mkdir(parents=True)
        (root / ".xnat2bids/batches" / name / "manifest.json").write_text(content)
    code, out, err = cli("status", str(root))
    assert (code, out) == (0, f"No SLURM batch in {root}.\n"), err
    code, out, err = cli("finalize", str(root))
    assert code == 0 and out.startswith(f"Nothing to finalize in {root}."), err
    code, _, err = cli("finalize", str(root), "--batch", "list")
    assert code == 1 and "the manifest" in err and "is unreadable" in err


def test_without_its_config_file_apply_refuses_to_reshape_a_dataset(cli, emulator, tmp_path, monkeypatch):
    from worlds import SMALL

    from reconcile.demo import populate

    populate(emulator.archive, "PROJ", [("001", "001_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    lab = tmp_path / "lab" / "xnat2bids.toml"
    lab.parent.mkdir()
    lab.write_text('[naming]\nsession_label = "strip-subject"\n')
    code, out, err = cli("apply", str(root), "-c", str(lab), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    serial = read_lock(root).serial

    # A cron job started elsewhere: no ./xnat2bids.toml, none in ~/.config.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    code, out, err = cli("--update", str(root))
    assert code == 1
    assert "error: no config file found (looked for xnat2bids.toml, " in err
    assert f"but {root}/.xnat2bids.lock was written with one" in err
    assert read_lock(root).serial == serial and (root / "sub-001/ses-MR1").is_dir()
    code, out, err = cli("plan", str(root), "-p", "PROJ")
    assert code == 0 and "warning: no config file found" in err and "config changed: naming (ses-MR1 → ses-001MR1)" in out

    # Found through $XNAT2BIDS_CONFIG, or the user's config folder: nothing to do.
    monkeypatch.setenv("XNAT2BIDS_CONFIG", str(lab))
    code, out, err = cli("--update", str(root))
    assert (code, err) == (0, "") and "Nothing to apply." in out
    monkeypatch.delenv("XNAT2BIDS_CONFIG")
    user_config = tmp_path / "home/.config/xnat2bids/xnat2bids.toml"
    user_config.parent.mkdir(parents=True)
    user_config.write_bytes(lab.read_bytes())
    code, out, err = cli("--update", str(root))
    assert (code, err) == (0, "") and "Nothing to apply." in out


def test_the_seed_flags_are_commands_of_their_own(cli, tmp_path):
    code, out, err = cli("--diff", str(tmp_path / "bids"), "plan")
    assert code == 1 and "--diff is a command of its own; it cannot be combined with `plan`" in out + err
    code, out, err = cli("--diff", str(tmp_path / "bids"))
    assert code == 1 and 'set projects = ["P"] in the config, or pass --project P to plan or apply' in err
    code, out, err = cli("--diff", "plan")  # click reads `plan` as the ROOT
    assert code == 1 and "--diff takes a BIDS root, and 'plan' is a command: run `xnat2bids plan …`" in err
    assert not Path("plan").exists()
    code, out, err = cli("--diff", str(tmp_path / "bids"), "--project", "PROJ")
    assert code == 1 and "No such option: --project" in err
    code, out, err = cli("--diff", str(tmp_path / "bids"), "--json")  # click would offer --version
    assert code == 1 and "No such option: --json\n" in err and "Possible options" not in err
    assert ("hint: --diff takes a ROOT (and --config) only; for other options use "
            "`xnat2bids plan --detailed-exitcode [ROOT] …`") in err
    for flags in (("--diff", str(tmp_path / "bids"), "--update", str(tmp_path / "bids")), ("--update", "--diff")):
        code, out, err = cli(*flags)  # a cron line naming both does not silently do one
        assert code == 1 and "--diff and --update cannot be combined" in err and out == "", flags


def test_the_seed_flags_without_a_root_use_the_configured_one(cli, emulator, tmp_path):
    from worlds import SMALL

    from reconcile.demo import populate

    populate(emulator.archive, "PROJ", [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "from-config"
    config = tmp_path / "lab.toml"
    config.write_text(f'bids_root = "{root}"\nprojects = ["PROJ"]\n')
    code, out, err = cli("--diff", "--config", str(config))
    assert code == 2, out + err
    assert f"xnat2bids plan for {root}" in out and "+ create  sub-01/ses-01MR1" in out
    code, out, err = cli("-c", str(config), "--update")
    assert code == 0, out + err
    assert (root / "sub-01/ses-01MR1").is_dir() and (root / ".xnat2bids.lock").is_file()
    code, out, err = cli("-c", str(config), "--diff")
    assert code == 0 and "No changes. 1 session up to date." in out


def test_ctrl_c_while_the_cli_is_still_importing_is_one_line_and_exit_1(monkeypatch, capsys):
    import types

    import pytest

    from reconcile.__main__ import run

    class Interrupted(types.ModuleType):
        def __getattr__(self, name: str):  # the import is under way when Ctrl-C arrives
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "reconcile.cli", Interrupted("reconcile.cli"))
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 1 and capsys.readouterr().err == "Interrupted.\n"


def test_no_server_configured_says_where_the_config_was_looked_for(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("XNAT_HOST")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    code, _, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ")
    assert code == 1
    assert (f"error: no XNAT server configured: no config file found (looked for xnat2bids.toml, "
            f"{tmp_path}/home/.config/xnat2bids/xnat2bids.toml)") in err
    config = tmp_path / "lab.toml"
    config.write_text('projects = ["PROJ"]\n')
    code, _, err = cli("plan", str(tmp_path / "bids"), "-c", str(config))
    assert code == 1 and f"error: no XNAT server configured: {config} has no xnat_url" in err


def test_xnat_host_that_the_config_overrides_is_named_in_a_warning(cli, emulator, tmp_path, monkeypatch):
    config = tmp_path / "lab.toml"
    config.write_text(f'xnat_url = "{emulator.url}"\n')
    monkeypatch.setenv("XNAT_HOST", "https://other.example.org")
    code, _, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "-c", str(config))
    assert code == 0
    assert f"warning: $XNAT_HOST (https://other.example.org) is ignored: {config} names {emulator.url}" in err


def test_check_of_a_root_that_does_not_exist_says_so(cli, tmp_path):
    code, _, err = cli("check", str(tmp_path / "typo"))
    assert code == 1 and f"BIDS root {tmp_path / 'typo'} does not exist" in err and "no lock at" not in err


def test_check_of_an_old_export_without_a_lock_says_xnat2bids_did_not_export_it(cli, emulator, tmp_path):
    # The lab's old script left subject folders and no lock; an apply into it refused the session
    # already there, so no lock was written: "run apply first" would send the user round in circles.
    emulator.archive.add_session("PROJ", "01", "01_MR1", date="2024-01-10")
    root = tmp_path / "bids"
    for subject in ("01", "02", "03", "04"):
        anat = root / f"sub-{subject}" / "ses-MR1" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{subject}_ses-MR1_T1w.nii.gz").write_bytes(b"old export")
    (root / "sub-01" / "ses-01MR1" / "anat").mkdir(parents=True)
    (root / "sub-01" / "ses-01MR1" / "anat" / "t1.nii.gz").write_bytes(b"old export")
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 1
    assert not (root / ".xnat2bids.lock").exists()

    code, out, err = cli("check", str(root))
    assert code == 1 and out == "", out + err
    assert err.splitlines() == [
        f"error: {root} was not exported by xnat2bids: it has no .xnat2bids.lock, but holds 4 subject folders "
        "(sub-01, sub-02, sub-03 and 1 more)",
        "hint: xnat2bids records only what it exports itself (README: Moving over from the old script): move the old "
        f"export aside (`mv {root} {root}.old`), run `xnat2bids apply {root}`, then compare and delete the old copy; "
        "or apply into it as it is, which exports only the sessions whose folders are missing or empty "
        "(`xnat2bids plan` names the others)",
    ]
    code, out, _ = cli("check", str(root), "--json")
    error = json.loads(out)["error"]
    assert code == 1 and error["kind"] == "config" and error["message"].startswith(f"{root} was not exported by xnat2bids")
    code, out, _ = cli("show", str(root))  # nor does show call it "nothing exported yet"
    assert code == 0 and out == (f"No lock at {root / '.xnat2bids.lock'}: nothing exported by xnat2bids here, though it "
                                 "holds 4 subject folders (sub-01, sub-02, sub-03 and 1 more) (another export; README: "
                                 "Moving over from the old script).\n"), out

    (root / "sub-01").rename(tmp_path / "sub-01.old")  # one subject folder: said so in the singular
    for subject in ("02", "03"):
        (root / f"sub-{subject}").rename(tmp_path / f"sub-{subject}.old")
    code, _, err = cli("check", str(root))
    assert code == 1 and "but holds 1 subject folder (sub-04)\n" in err, err
    (root / "sub-04").rename(tmp_path / "sub-04.old")  # no subject folder: nothing exported here yet
    code, _, err = cli("check", str(root))
    assert code == 1 and err.splitlines() == [f"error: no lock at {root / '.xnat2bids.lock'}",
                                              "hint: run `xnat2bids apply` first"], err


def test_a_host_name_that_does_not_resolve_is_named():
    from reconcile.credentials import Credentials
    from reconcile.errors import RemoteError
    from reconcile.xnat import XnatClient

    client = XnatClient("http://no-such-host.invalid", Credentials("u", "p", "test"), retries=4)  # RFC 6761
    try:
        client.login()
    except RemoteError as exc:
        assert "the name no-such-host.invalid does not resolve" in exc.summary and "typo" in (exc.hint or "")
        assert "after 1 attempt(s)" in (exc.detail or "")  # not retried: a name does not resolve seconds later
    else:
        raise AssertionError("logged in to a host that cannot exist")
    finally:
        client.close()


SIGNALLED_RUNS = {
    # SIGTERM while the CLI's modules load: one line and exit 1, as later
    "during-imports": ("import builtins\nreal = builtins.__import__\n"
                       "def imp(name, *a, **k):\n"
                       "    if name == 'reconcile.cli':\n"
                       "        os.kill(os.getpid(), signal.SIGTERM)\n"
                       "    return real(name, *a, **k)\n"
                       "builtins.__import__ = imp\n", 1, "Interrupted.\n"),
    # SIGTERM once the work is done (here: at exit): the run's own status stands
    "after-the-work": ("import atexit\natexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n", 0, ""),
}


@pytest.mark.parametrize("case", sorted(SIGNALLED_RUNS))
def test_a_signal_before_or_after_the_work_gives_the_documented_status(case):
    setup, status, stderr = SIGNALLED_RUNS[case]
    script = ("import os, signal, sys\nsys.argv = ['xnat2bids', '--version']\n" + setup +
              "from reconcile.__main__ import run\nrun()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (status, stderr), done.stdout + done.stderr


def test_a_malformed_xnat_host_is_said_before_credentials_are_looked_for(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("XNAT_HOST", "ftp://xnat.example.org")
    monkeypatch.delenv("XNAT_USER")
    monkeypatch.delenv("XNAT_PASS")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc either
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ")
    assert code == 1 and err.startswith("error: not an XNAT URL: 'ftp://xnat.example.org'\n  the scheme must be http or https")
    assert "credentials" not in err.split("hint:")[0]


def test_a_resolver_that_fails_for_now_is_asked_again(monkeypatch):
    # EAI_AGAIN (a busy resolver, hundreds of array tasks starting): retried, not called a typo.
    from reconcile.credentials import Credentials
    from reconcile.errors import RemoteError
    from reconcile.xnat import XnatClient

    asked = []

    def busy(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", busy)
    with XnatClient("http://xnat.example.org", Credentials("u", "p", "test"), retries=2, backoff=0.0) as client:
        try:
            client.login()
        except RemoteError as exc:
            assert "does not resolve" not in exc.summary and "typo" not in (exc.hint or "")
            assert "after 3 attempt(s)" in (exc.detail or "")
        else:
            raise AssertionError("logged in through a failing resolver")
    assert asked.count("xnat.example.org") == 3


def test_apply_refuses_a_bids_root_with_whitespace_before_any_work(cli, emulator, tmp_path):
    # heudiconv (nipype) reads dcm2niix's output split at whitespace: every session would fail deep
    # inside it. By a link without whitespace the same folder converts.
    emulator.archive.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    root = tmp_path / "My Lab" / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and f"error: BIDS root {root} has whitespace in its path, where heudiconv cannot convert" in err
    assert "a link to it" in err and not root.exists()
    code, out, err = cli("plan", str(root), "-p", "PROJ")  # planning reads it fine, and says what apply refuses
    assert code == 0 and f"note: apply refuses to export anything here: BIDS root {root} has whitespace" in out, out


def test_a_bids_root_with_whitespace_still_recovers_but_converts_nothing(cli, emulator, tmp_path):
    # Exported through a link without whitespace; an apply by the real path (which would settle
    # what an interrupted one left) runs, and is refused only once it has sessions to convert.
    add(emulator.archive, [("S1", "S1_MR1", "2024-01-10")], series=SMALL)
    real = tmp_path / "My Lab" / "bids"
    real.mkdir(parents=True)
    link = tmp_path / "lab-bids"
    link.symlink_to(real)
    assert cli("apply", str(link), "-p", "PROJ", "--yes")[0] == 0
    assert read_lock(real).serial == 1 and (real / ".xnat2bids").is_dir()
    code, out, err = cli("apply", str(real), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out, out + err
    emulator.archive.add_session("PROJ", "S2", "S2_MR1", date="2024-01-11")
    code, out, err = cli("apply", str(real), "-p", "PROJ", "--yes")
    assert code == 1 and "has whitespace in its path, where heudiconv cannot convert" in err
    assert not (real / "sub-S2").exists()


def test_emulator_serve_says_when_data_holds_no_sessions(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    missing = subprocess.run([sys.executable, "-m", "reconcile", "emulator", "serve", "--port", str(port),
                              "--data", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and f"error: --data {tmp_path / 'nowhere'} is not a folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    served = subprocess.Popen([sys.executable, "-m", "reconcile", "emulator", "serve", "--port", str(port),
                               "--data", str(tmp_path / "empty")], stderr=subprocess.PIPE, text=True)
    try:
        line = served.stderr.readline()
        assert line.startswith(f"warning: --data {tmp_path / 'empty'} holds no sessions"), line
    finally:
        served.kill()
        served.wait()


def test_emulator_serve_misbehaves_as_its_faults_say(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = subprocess.run([sys.executable, "-m", "reconcile", "emulator", "serve", "--port", str(port),
                          "--fault", "status:/data/projects:retries=3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "error: --fault: fault 'status:/data/projects:retries=3': 'retries=3' is not one" \
        in bad.stderr
    served = subprocess.Popen([sys.executable, "-m", "reconcile", "emulator", "serve", "--port", str(port),
                               "--fault", "status:/data/projects$:status=503,times=1"], stdout=subprocess.PIPE, text=True)
    try:
        line = served.stdout.readline()
        assert line.startswith(f"XNAT emulator on http://127.0.0.1:{port}"), line
        url, auth = f"http://127.0.0.1:{port}/data/projects", ("admin", "admin")
        assert requests.get(url, auth=auth, timeout=10).status_code == 503
        assert requests.get(url, auth=auth, timeout=10).status_code == 200  # times=1
    finally:
        served.kill()
        served.wait()


def test_history_into_a_pipe_closed_early_ends_quietly_as_coreutils_do(tmp_path):
    root = tmp_path / "bids"
    plan = compute_plan(Lock.new(), RemoteState((), None), LocalState({}), Config())
    entry = append_history(root, plan, ApplyReport(lock=Lock.new()))
    (root / ".xnat2bids" / "history.jsonl").write_text((json.dumps(entry) + "\n") * 20000)
    shell = f"{sys.executable} -m reconcile history --json {root} | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "141" and done.stderr == "", done.stderr
