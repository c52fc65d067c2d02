"""Who may use ``lipforcing serve``: the server's token and where a server without one may listen.

    token = server_token(flag=args.token, file=args.token_file, environ=os.environ)  # None: no token
    check_exposure(args.host, token, insecure_no_auth=args.insecure_no_auth)        # before the warm-up

The token comes from ``--token`` (visible to every user of the machine in ``ps``), ``--token-file`` (the
file's text, blanks around it dropped) or ``$LIPFORCING_TOKEN``, in that order. An empty one is an error,
never "no authentication": a script's ``--token "$TOKEN"`` with ``TOKEN`` unset must not serve an open
server. A server without a token listens on loopback only, unless ``--insecure-no-auth`` says an open server
on the network is meant.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Mapping
from pathlib import Path

from ...errors import ConfigError

TOKEN_VARIABLE = "LIPFORCING_TOKEN"


def server_token(*, flag: str | None, file: str | None, environ: Mapping[str, str]) -> str | None:
    """The token clients must send, or None when none was given anywhere; ConfigError for an empty one."""
    given = given_token(flag=flag, file=file, environ=environ)
    if given is None:
        return None
    token, source = given
    if not token:
        raise ConfigError(f"{source} is empty: give a token, or leave it out to serve on loopback without one")
    return token


def client_token(*, flag: str | None, file: str | None, environ: Mapping[str, str]) -> str | None:
    """The token a client sends (``lipforcing client``, ``bench-serve``): the same sources as the server's."""
    given = given_token(flag=flag, file=file, environ=environ)
    return given[0] or None if given is not None else None


def given_token(*, flag: str | None, file: str | None, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(the token, blanks around it dropped; where it came from), or None when none was given anywhere."""
    if flag is not None:
        token, source = flag, "--token"
    elif file is not None:
        try:
            token = Path(file).read_text()
        except OSError as exc:
            raise ConfigError(f"--token-file {file}: {exc.strerror or exc}") from None
        except ValueError:
            raise ConfigError(f"--token-file {file}: not a text file") from None
        source = f"--token-file {file}"
    elif TOKEN_VARIABLE in environ:
        token, source = environ[TOKEN_VARIABLE], f"${TOKEN_VARIABLE}"
    else:
        return None
    return token.strip(), source  # clients' Bearer tokens are stripped too: surrounding blanks could never match


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to anything
        return False


def check_exposure(host: str, token: str | None, *, insecure_no_auth: bool) -> None:
    """ConfigError for a server without a token on an address other machines can reach (unless meant)."""
    if token is None and not insecure_no_auth and not is_loopback(host):
        raise ConfigError(f"--host {host} is reachable from other machines and the server has no token: give "
                          f"--token-file FILE (or ${TOKEN_VARIABLE}), or --insecure-no-auth to serve anyone who "
                          f"can connect")


def token_matches(token: str | None, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
    """Whether a request carries ``token`` (``Authorization: Bearer`` or ``?token=``); any request when None."""
    if token is None:
        return True
    given = query.get("token") or ""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return secrets.compare_digest(given.encode(), token.encode())
