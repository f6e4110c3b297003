"""Credential lookup: env > token file > netrc > prompt, warnings, and secrets kept out of sight."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest
import typer
from click.testing import CliRunner

from reconcile.credentials import Credentials, default_url, resolve_credentials
from reconcile.errors import AuthError, ConfigError

URL = "https://xnat.example.org/xnat"
SENTINEL = "S3NT1NEL-pw-%$"


def write_netrc(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def no_prompt(_: str) -> str:
    raise AssertionError("must not prompt")


def test_env_beats_netrc_and_prompt(tmp_path: Path) -> None:
    netrc = write_netrc(tmp_path / "netrc", "machine xnat.example.org login nuser password npass\n")
    env = {"XNAT_USER": "euser", "XNAT_PASS": "epass"}
    creds = resolve_credentials(URL, env=env, netrc_path=netrc, prompt=no_prompt)
    assert (creds.user, creds.password, creds.source) == ("euser", "epass", "env")


def test_netrc_entry_for_the_url_host_is_used(tmp_path: Path) -> None:
    netrc = write_netrc(
        tmp_path / "netrc",
        "machine other.org login ouser password opass\nmachine xnat.example.org login nuser password npass\n",
    )
    creds = resolve_credentials(URL, env={}, netrc_path=netrc, prompt=no_prompt)
    assert (creds.user, creds.password, creds.source) == ("nuser", "npass", "netrc")


def test_netrc_entry_with_port_matches_host_and_port(tmp_path: Path) -> None:
    netrc = write_netrc(
        tmp_path / "netrc",
        "machine localhost login plain password p1\nmachine localhost:8080 login ported password p2\n",
    )
    assert resolve_credentials("http://localhost:8080", env={}, netrc_path=netrc).user == "ported"
    assert resolve_credentials("http://localhost:9090", env={}, netrc_path=netrc).user == "plain"


def test_netrc_default_entry_serves_a_host_without_a_machine_line(tmp_path: Path) -> None:
    netrc = write_netrc(
        tmp_path / "netrc", f"machine other.org login ouser password opass\ndefault login alice password {SENTINEL}\n"
    )
    creds = resolve_credentials("http://127.0.0.1:18090", env={}, netrc_path=netrc, prompt=no_prompt)
    assert (creds.user, creds.password, creds.source) == ("alice", SENTINEL, "netrc")
    assert creds.where == f"the 'default' entry in {netrc}"


def test_netrc_machine_line_beats_the_default_entry(tmp_path: Path) -> None:
    netrc = write_netrc(
        tmp_path / "netrc",
        "default login duser password dpass\nmachine localhost login plain password p1\n"
        "machine localhost:8080 login ported password p2\n",
    )
    assert resolve_credentials("http://localhost:8080", env={}, netrc_path=netrc).user == "ported"
    assert resolve_credentials("http://localhost:9090", env={}, netrc_path=netrc).user == "plain"
    assert resolve_credentials("http://127.0.0.1:9090", env={}, netrc_path=netrc).user == "duser"


def test_netrc_default_entry_comes_after_env_and_token_file(tmp_path: Path) -> None:
    netrc = write_netrc(tmp_path / "netrc", "default login duser password dpass\n")
    token = tmp_path / "token.json"
    token.write_text(json.dumps({"alias": "0b5c2f4e-1a2b-4c3d-8e9f-0123456789ab", "secret": "x" * 64}))
    env = {"XNAT_USER": "euser", "XNAT_PASS": "epass"}
    assert resolve_credentials(URL, env=env, netrc_path=netrc).source == "env"
    assert resolve_credentials(URL, env={"XNAT_TOKEN_FILE": str(token)}, netrc_path=netrc).source == "token-file"


def test_netrc_env_variable_points_at_the_file(tmp_path: Path) -> None:
    netrc = write_netrc(tmp_path / "elsewhere", "machine xnat.example.org login nuser password npass\n")
    creds = resolve_credentials(URL, env={"NETRC": str(netrc)})
    assert creds.source == "netrc" and creds.user == "nuser"


def test_world_readable_netrc_warns_but_is_used(tmp_path: Path) -> None:
    netrc = write_netrc(tmp_path / "netrc", "machine xnat.example.org login nuser password npass\n", 0o644)
    warnings: list[str] = []
    creds = resolve_credentials(URL, env={}, netrc_path=netrc, warn=warnings.append)
    assert creds.user == "nuser"
    assert len(warnings) == 1 and "0644" in warnings[0] and "chmod 600" in warnings[0]


def test_private_netrc_does_not_warn(tmp_path: Path) -> None:
    netrc = write_netrc(tmp_path / "netrc", "machine xnat.example.org login nuser password npass\n")
    warnings: list[str] = []
    resolve_credentials(URL, env={}, netrc_path=netrc, warn=warnings.append)
    assert warnings == []


def test_netrc_without_the_host_falls_through_to_prompt(tmp_path: Path) -> None:
    netrc = write_netrc(tmp_path / "netrc", "machine other.org login ouser password opass\n")
    asked: list[str] = []

    def prompt(message: str) -> str:
        asked.append(message)
        return "puser"

    creds = resolve_credentials(
        URL, env={}, netrc_path=netrc, prompt=prompt, password_prompt=lambda m: "ppass"
    )
    assert (creds.user, creds.password, creds.source) == ("puser", "ppass", "prompt")
    assert asked and "xnat.example.org" in asked[0]


@pytest.mark.filterwarnings("ignore::getpass.GetPassWarning")  # no terminal under the test runner
def test_prompts_show_one_colon_with_typer(tmp_path: Path) -> None:
    # typer.prompt adds ": " to the text it is given, as the getpass default does here.
    with CliRunner().isolation(input="alice\npw\n") as streams:  # stdout first, in every click version
        creds = resolve_credentials(
            "http://127.0.0.1:18090", env={}, netrc_path=tmp_path / "none", prompt=typer.prompt,
            password_prompt=lambda text: typer.prompt(text, hide_input=True),
        )
        shown = streams[0].getvalue().decode()
    assert (creds.user, creds.password, creds.source) == ("alice", "pw", "prompt")
    assert shown.startswith("XNAT user for 127.0.0.1: ") and "Password for alice@127.0.0.1:" in shown
    assert "::" not in shown and ": :" not in shown


def test_default_password_prompt_ends_in_one_colon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(getpass, "getpass", lambda text: asked.append(text) or "pw")
    creds = resolve_credentials(URL, env={}, netrc_path=tmp_path / "none", prompt=lambda text: "alice")
    assert creds.password == "pw"
    assert asked == ["Password for alice@xnat.example.org: "]


def test_nothing_found_raises_auth_error_with_the_three_ways(tmp_path: Path) -> None:
    with pytest.raises(AuthError) as info:
        resolve_credentials(URL, env={}, netrc_path=tmp_path / "missing")
    text = str(info.value)
    assert "xnat.example.org" in text
    assert "XNAT_USER" in text and "XNAT_PASS" in text and ".netrc" in text and "prompt" in text


def test_half_set_environment_warns_and_is_ignored(tmp_path: Path) -> None:
    netrc = write_netrc(tmp_path / "netrc", "machine xnat.example.org login nuser password npass\n")
    warnings: list[str] = []
    creds = resolve_credentials(URL, env={"XNAT_USER": "euser"}, netrc_path=netrc, warn=warnings.append)
    assert creds.source == "netrc"
    assert any("XNAT_PASS" in w for w in warnings)


def test_token_file_gives_alias_and_secret(tmp_path: Path) -> None:
    token = tmp_path / "token.json"
    token.write_text(json.dumps({"alias": "0b5c2f4e-1a2b-4c3d-8e9f-0123456789ab", "secret": "x" * 64}))
    creds = resolve_credentials(URL, env={"XNAT_TOKEN_FILE": str(token)}, netrc_path=tmp_path / "none")
    assert creds.source == "token-file" and creds.user.startswith("0b5c2f4e") and creds.password == "x" * 64


@pytest.mark.parametrize("content, fault", [
    ('{"alias": "a1"}', "no 'secret' in it"),
    (f'{{"alias": "a1", "secret": "{SENTINEL}"', "not valid JSON"),  # cut short: the secret is not quoted
    ('["a1"]', "not a JSON object"),
    (None, "No such file or directory"),
])
def test_a_bad_token_file_says_what_is_wrong_and_never_quotes_it(tmp_path: Path, content, fault) -> None:
    token = tmp_path / "token.json"
    if content is not None:
        token.write_text(content)
    with pytest.raises(AuthError) as exc:
        resolve_credentials(URL, env={"XNAT_TOKEN_FILE": str(token)}, netrc_path=tmp_path / "none")
    assert (exc.value.summary, exc.value.detail) == (f"cannot read the XNAT token file {token}", fault)
    assert SENTINEL not in str(exc.value)


def test_a_token_file_others_can_read_is_used_with_a_warning(tmp_path: Path) -> None:
    token = tmp_path / "token.json"
    token.write_text(json.dumps({"alias": "a1", "secret": "s" * 64}))
    token.chmod(0o644)
    warnings: list[str] = []
    creds = resolve_credentials(URL, env={"XNAT_TOKEN_FILE": str(token)}, netrc_path=tmp_path / "none",
                                warn=warnings.append)
    assert creds.source == "token-file"
    assert warnings == [f"{token} is readable by others (mode 0644); run: chmod 600 {token}"]
    token.chmod(0o600)
    warnings.clear()
    resolve_credentials(URL, env={"XNAT_TOKEN_FILE": str(token)}, netrc_path=tmp_path / "none", warn=warnings.append)
    assert warnings == []


def test_malformed_netrc_error_does_not_quote_the_password(tmp_path: Path) -> None:
    import netrc as stdlib_netrc

    netrc = write_netrc(tmp_path / "netrc", f"machine xnat.example.org login nuser password {SENTINEL} bogus\n")
    try:
        stdlib_netrc.netrc(str(netrc))
    except stdlib_netrc.NetrcParseError:
        pass
    else:
        pytest.skip("this Python's netrc module accepts the line, so there is no parse error to report")
    with pytest.raises(AuthError) as info:
        resolve_credentials(URL, env={}, netrc_path=netrc)
    assert str(netrc) in str(info.value)
    assert SENTINEL not in str(info.value) and info.value.__cause__ is None


@pytest.mark.parametrize("entry, lacks", [("login nuser password", "password"), ("password npass", "login")])
def test_a_netrc_entry_for_the_host_without_both_is_named(tmp_path: Path, entry: str, lacks: str) -> None:
    # Not "no credentials found, add a machine line": the line is there, short of a value.
    # Unattended; at a terminal the user is asked instead, as before.
    netrc = write_netrc(tmp_path / "netrc", f"machine xnat.example.org {entry}\n")
    with pytest.raises(AuthError) as info:
        resolve_credentials(URL, env={}, netrc_path=netrc)
    assert info.value.summary == f"the 'machine xnat.example.org' entry in {netrc} has no {lacks}"
    assert "npass" not in str(info.value)
    creds = resolve_credentials(URL, env={}, netrc_path=netrc, prompt=lambda _: "typed",
                                password_prompt=lambda _: "typed-pw")
    assert (creds.user, creds.password, creds.source) == ("typed", "typed-pw", "prompt")


def test_a_netrc_that_is_a_folder_is_named_so(tmp_path: Path) -> None:
    warnings: list[str] = []
    (tmp_path / "netrc").mkdir()
    with pytest.raises(AuthError) as info:
        resolve_credentials(URL, env={}, netrc_path=tmp_path / "netrc", warn=warnings.append, prompt=no_prompt)
    assert info.value.summary == f"cannot read {tmp_path / 'netrc'}: Is a directory" and warnings == []


def test_password_is_not_in_repr() -> None:
    creds = Credentials("alice", SENTINEL, "env")
    assert SENTINEL not in repr(creds) and SENTINEL not in str(creds)
    assert "alice" in repr(creds)


def test_default_url_comes_from_xnat_host() -> None:
    assert default_url({"XNAT_HOST": "https://xnat.example.org/"}) == "https://xnat.example.org"
    assert default_url({"XNAT_HOST": "xnat.example.org"}) == "https://xnat.example.org"
    assert default_url({}) is None


def test_xnat_host_with_a_user_or_password_is_refused_without_showing_them(cli, tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError) as info:
        default_url({"XNAT_HOST": f"https://alice:{SENTINEL}@xnat.example.org"})
    assert "$XNAT_HOST holds a user name or password" in str(info.value) and SENTINEL not in str(info.value)
    # Refused also when the config names the server: the variable would travel on to jobs.
    config = tmp_path / "lab.toml"
    config.write_text('xnat_url = "http://127.0.0.1:9"\nprojects = ["P"]\n')
    monkeypatch.setenv("XNAT_HOST", f"https://alice:{SENTINEL}@xnat.example.org")
    code, out, err = cli("plan", str(tmp_path / "bids"), "-c", str(config))
    assert code == 1 and "error: $XNAT_HOST holds a user name or password (an '@')" in err
    assert SENTINEL not in out + err


def test_real_environment_is_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XNAT_USER", "envuser")
    monkeypatch.setenv("XNAT_PASS", "envpass")
    creds = resolve_credentials(URL, netrc_path=tmp_path / "none", prompt=no_prompt)
    assert (creds.user, creds.password, creds.source) == ("envuser", "envpass", "env")


@pytest.mark.parametrize(("url", "warned"), [
    ("http://xnat.example.org", True), ("http://10.0.0.5:8080/xnat", True), ("HTTP://Xnat.Example.org", True),
    ("https://xnat.example.org", False), ("http://127.0.0.1:8080", False), ("http://localhost:8080", False),
    ("http://[::1]:8080", False),
])
def test_a_plain_http_url_to_another_machine_is_warned_about(url: str, warned: bool) -> None:
    from reconcile.credentials import cleartext

    assert cleartext(url) is warned


def test_connecting_over_plain_http_to_another_machine_warns(monkeypatch, capsys) -> None:
    from reconcile.cli import connect
    from reconcile.config import Config

    monkeypatch.setenv("XNAT_USER", "alice")
    monkeypatch.setenv("XNAT_PASS", SENTINEL)
    for url, warned in (("http://xnat.example.org/xnat", True), ("https://xnat.example.org", False)):
        with connect(Config(xnat_url=url), interactive=False):
            pass  # no request is made before the first call
        err = capsys.readouterr().err
        assert ("warning: http://xnat.example.org/xnat is reached over plain http: the password (or token) "
                "travels unencrypted; use an https:// URL" in err) is warned
        assert SENTINEL not in err
