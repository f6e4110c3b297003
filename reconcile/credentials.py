"""Where the XNAT user name and password come from: environment, token file, netrc or a prompt.

Owns the lookup order and the warnings about it; never reads secrets from the command line
and never puts a password into a repr, log line or error message.
"""

from __future__ import annotations

import getpass
import json
import netrc
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from reconcile.errors import AuthError, ConfigError

ENV_USER = "XNAT_USER"
ENV_PASS = "XNAT_PASS"
ENV_HOST = "XNAT_HOST"
# A JSON file as returned by /data/services/tokens/issue ({"alias": ..., "secret": ...}).
ENV_TOKEN_FILE = "XNAT_TOKEN_FILE"

# Environment variables that look like a credential (any service's: AWS_SECRET_ACCESS_KEY, a
# GITHUB_TOKEN), kept from the processes xnat2bids starts: /proc/PID/environ shows them.
_SECRET_ENV = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL|XNAT_USER", re.IGNORECASE)


def without_secrets(env: Mapping[str, str], keep: frozenset[str] = frozenset()) -> dict[str, str]:
    """`env` without the variables that look like a credential, but for those named in `keep`."""
    return {k: v for k, v in env.items() if k in keep or not _SECRET_ENV.search(k)}

_HINT = (
    "give credentials in one of four ways: export XNAT_USER and XNAT_PASS; "
    "point $XNAT_TOKEN_FILE at an alias token's JSON (from /data/services/tokens/issue); "
    "add a 'machine {host} login USER password PASS' line to ~/.netrc (mode 0600, or point $NETRC at it); "
    "or run interactively to be prompted"
)


@dataclass(frozen=True)
class Credentials:
    """A user (or alias token) and its password (or token secret)."""

    user: str
    password: str = field(repr=False)
    source: str  # "netrc" | "env" | "prompt" | "token-file" | "batch-token" (one apply issued for a SLURM batch)
    where: str = ""  # the netrc entry or token file they came from, for hints; never a secret

    def rejected_hint(self) -> str:
        """What to fix when XNAT rejects these credentials: it depends on where they came from."""
        if self.source == "env":
            return f"check {ENV_USER}/{ENV_PASS}"
        if self.source == "netrc":
            return f"check {self.where or 'the ~/.netrc entry for this host'}"
        if self.source == "batch-token":
            return ("the alias token apply issued for this SLURM batch expired or was revoked; `xnat2bids apply` "
                    "submits what is left with a new one")
        if self.source == "token-file":
            where = f" in {self.where}" if self.where else ""
            return f"the alias token{where} may have expired or been revoked; issue a new one"
        if self.source == "prompt":
            return "the user name or password typed at the prompt was wrong; run again and retype them"
        return "check the XNAT user name and password"


def default_url(env: Mapping[str, str] = os.environ) -> str | None:
    """The XNAT URL from $XNAT_HOST, if set (a bare host name gets https://).

    One holding a user name or password (`https://user:pw@host`) is refused, as in the config:
    the variable would travel on to SLURM jobs and converters."""
    host = env.get(ENV_HOST, "").strip()
    if not host:
        return None
    if "@" in host:
        raise ConfigError(f"${ENV_HOST} holds a user name or password (an '@')",
                          hint=f"set {ENV_HOST} to the bare URL; credentials go in ~/.netrc, "
                               f"{ENV_USER}/{ENV_PASS} or the prompt")
    if "://" not in host:
        host = f"https://{host}"
    return host.rstrip("/")


def cleartext(url: str) -> bool:
    """An http:// URL to another machine (this one's loopback, as for the emulator, is fine)."""
    import ipaddress

    parts = urlsplit(url)
    if parts.scheme.lower() != "http":
        return False
    host = parts.hostname or ""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() != "localhost"


def _host_of(url: str) -> tuple[str, str]:
    """(hostname, host:port) of a URL; a bare host name is accepted too."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    hostname = (parts.hostname or "").lower()
    netloc = parts.netloc.rsplit("@", 1)[-1].lower()
    return hostname, netloc


def _from_env(env: Mapping[str, str], warn: Callable[[str], None]) -> Credentials | None:
    user, password = env.get(ENV_USER, ""), env.get(ENV_PASS, "")
    if user and password:
        return Credentials(user, password, "env")
    if user or password:
        missing = ENV_PASS if user else ENV_USER
        warn(f"{ENV_USER}/{ENV_PASS}: {missing} is not set, ignoring the environment credentials")
    return None


def _from_token_file(env: Mapping[str, str], warn: Callable[[str], None]) -> Credentials | None:
    name = env.get(ENV_TOKEN_FILE, "")
    if not name:
        return None
    path = Path(name).expanduser()
    _warn_if_shared(path, warn)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        alias, secret = data["alias"], data["secret"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuthError(
            f"cannot read the XNAT token file {path}",
            detail=_token_file_fault(exc),
            hint='the file must hold JSON with "alias" and "secret" (from /data/services/tokens/issue)',
        ) from None  # the secret may be in the parse error, so no chaining
    if not isinstance(alias, str) or not isinstance(secret, str) or not alias or not secret:
        raise AuthError(f"the XNAT token file {path} has an empty alias or secret")
    return Credentials(alias, secret, "token-file", where=str(path))


def _token_file_fault(exc: Exception) -> str:
    """What is wrong with a token file, without any of its content (a parse error quotes it)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} in it"
    if isinstance(exc, TypeError):
        return "not a JSON object"
    return "not valid JSON"


def _warn_if_shared(path: Path, warn: Callable[[str], None]) -> None:
    """A file of secrets others may read (a token file, .netrc) is used, with a warning."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if os.name == "posix" and mode & 0o077:
        warn(f"{path} is readable by others (mode {mode:04o}); run: chmod 600 {path}")


def _netrc_file(env: Mapping[str, str], netrc_path: Path | None) -> Path:
    if netrc_path is not None:
        return Path(netrc_path)
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    return Path("~/.netrc").expanduser()


def _from_netrc(
    url: str, env: Mapping[str, str], netrc_path: Path | None, warn: Callable[[str], None], *, can_ask: bool = False
) -> Credentials | None:
    """The netrc's credentials for `url`'s host. Its entry for the host without a login or a
    password: None when the user `can_ask`ed for them, else an error naming the entry."""
    path = _netrc_file(env, netrc_path)
    if not path.exists():
        return None
    if path.is_file():
        _warn_if_shared(path, warn)
    try:
        # An explicit file name skips the stdlib's own permission check (which raises); we warn instead.
        parsed = netrc.netrc(str(path))
    except OSError as exc:
        raise AuthError(f"cannot read {path}: {exc.strerror or exc}", hint=f"{path} must be a file you can read") from None
    except netrc.NetrcParseError as exc:
        line = getattr(exc, "lineno", None)
        raise AuthError(
            f"cannot parse {path}" + (f" (line {line})" if line else ""),
            hint="fix the file or remove the entry for this host",
        ) from None  # NetrcParseError messages can quote the offending token, i.e. a password
    hostname, netloc = _host_of(url)
    machines = [key for key in dict.fromkeys((netloc, hostname)) if key and key in parsed.hosts]
    for key in machines:
        login, _account, password = parsed.hosts[key]
        if login and password:
            return Credentials(login, password, "netrc", where=f"the 'machine {key}' entry in {path}")
    if machines and can_ask:
        return None
    if machines:  # the host's entry is there, but without both: not the same as no entry at all
        login, _account, password = parsed.hosts[machines[0]]
        raise AuthError(f"the 'machine {machines[0]}' entry in {path} has no {'password' if login else 'login'}",
                        hint=f"give it both: machine {machines[0]} login USER password PASS")
    # As curl and requests do: a 'default' entry serves every host without a 'machine' line.
    entry = parsed.authenticators(hostname)
    if entry is not None and entry[0] and entry[2]:
        return Credentials(entry[0], entry[2], "netrc", where=f"the 'default' entry in {path}")
    return None


def _getpass(text: str) -> str:
    """`getpass.getpass` with the ": " that typer.prompt adds (getpass shows the text as it is)."""
    return getpass.getpass(f"{text}: ")


def resolve_credentials(
    url: str,
    *,
    env: Mapping[str, str] = os.environ,
    netrc_path: Path | None = None,
    prompt: Callable[[str], str] | None = None,
    warn: Callable[[str], None] = lambda m: None,
    password_prompt: Callable[[str], str] | None = None,
) -> Credentials:
    """Find credentials for `url`: env XNAT_USER/XNAT_PASS (or XNAT_TOKEN_FILE), netrc, then a prompt.

    `prompt` asks for the user name; the password is read with `password_prompt`
    (default `getpass.getpass`) so it is never echoed. Both get a text without the trailing
    ": ", which they add themselves, as `typer.prompt` does. Without a prompt, a miss raises AuthError.
    """
    found = (_from_env(env, warn) or _from_token_file(env, warn)
             or _from_netrc(url, env, netrc_path, warn, can_ask=prompt is not None))
    if found is not None:
        return found
    hostname, _ = _host_of(url)
    if prompt is not None:
        user = prompt(f"XNAT user for {hostname}").strip()
        ask_password = password_prompt or _getpass
        password = ask_password(f"Password for {user}@{hostname}")
        if not user or not password:
            raise AuthError("no XNAT user name or password given", hint=_HINT.format(host=hostname))
        return Credentials(user, password, "prompt")
    raise AuthError(f"no XNAT credentials found for {hostname}", hint=_HINT.format(host=hostname))
