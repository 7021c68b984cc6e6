"""``relayd oauth token`` and ``relayd oauth authorize``: operator commands for XOAUTH2.

``token`` fetches a fresh access token now for each xoauth2 smarthost (or the one named) and
reports the account and expiry, never the token; on failure it explains what to do.
``authorize`` runs the one-time interactive consent (Microsoft device code, Google code paste)
and stores the refresh token encrypted under ``state_dir``. With ``shared_state`` both also
write the fleet's copy (docs/fleet.md), so a sign-in or a refresh on one node serves all.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time

from relayd.commands.io import IO
from relayd.config.schema import AuthMethod, Config, OAuthProvider, Smarthost
from relayd.errors import OAuthError
from relayd.oauth.source import build_token_source, oauth_config
from relayd.oauth.store import OAuthStore, SharedCopies


def _fleet(cfg: Config) -> SharedCopies | None:
    """The fleet's copy of the OAuth records, with ``shared_state`` only."""
    if cfg.shared_state is None:
        return None
    # lazy: psycopg only for a relay in a fleet
    from relayd.shared.db import SharedDB
    from relayd.shared.oauth import SharedOAuth

    return SharedOAuth(SharedDB(cfg.shared_state))


def _targets(cfg: Config, name: str | None, io: IO) -> list[Smarthost] | None:
    if name:
        try:
            host = cfg.smarthost(name)
        except KeyError as exc:
            print(f"relayd: {exc.args[0]}", file=io.err)
            return None
        if host.auth.method is not AuthMethod.XOAUTH2:
            print(f"relayd: smarthost {name} does not use auth.method: xoauth2 "
                  f"(it uses {host.auth.method.value})", file=io.err)
            return None
        return [host]
    hosts = [h for h in cfg.smarthosts if h.auth.method is AuthMethod.XOAUTH2]
    if not hosts:
        print("relayd: no smarthost uses auth.method: xoauth2", file=io.err)
        return None
    return hosts


def _when(expires_at: float) -> str:
    stamp = dt.datetime.fromtimestamp(expires_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    left = int(expires_at - time.time())
    return f"{stamp} (in {left // 60} min)" if left >= 0 else f"{stamp} (expired)"


def _explain(name: str, exc: OAuthError, io: IO) -> None:
    kind = "needs action" if exc.permanent else "temporary failure"
    print(f"{name}: no token ({kind}): {exc}", file=io.out)
    if exc.hint:
        print(f"  what to do: {exc.hint}", file=io.out)
    if not exc.permanent:
        print("  queued mail waits and is retried; nothing bounces.", file=io.out)


async def _token(cfg: Config, host: Smarthost, io: IO) -> bool:
    source = build_token_source(host, state_dir=cfg.state_dir, key_file=cfg.secrets.key_file,
                                shared=_fleet(cfg))
    try:
        token = await source.token(force=True)
    except OAuthError as exc:
        _explain(host.name, exc, io)
        return False
    print(f"{host.name}: token OK for {token.account or '(unknown account)'} "
          f"via {source.description}; expires {_when(token.expires_at)}", file=io.out)
    return True


def _authorize(cfg: Config, host: Smarthost, io: IO) -> bool:
    oauth = oauth_config(host)
    store = OAuthStore(cfg.state_dir, host.name, cfg.secrets.key_file, _fleet(cfg))
    try:
        if oauth.provider is OAuthProvider.AZURE:
            from relayd.oauth import azure as oauth_azure  # lazy: MSAL only for Entra ID
            account = oauth_azure.authorize(host, oauth, store, io.out)
        elif oauth.provider is OAuthProvider.GOOGLE:
            from relayd.oauth import google as oauth_google  # lazy: google-auth only for Google
            account = oauth_google.authorize(host, oauth, store, io.out, io.stdin)
        else:
            raise OAuthError(
                "provider generic has no interactive sign-in in relayd",
                hint="obtain a refresh token with your provider's tool, put it in a file "
                "(optionally as 'enc:...' from 'relayd secret encrypt') and set "
                "oauth.refresh_token_file and grant: refresh_token", permanent=True)
    except OAuthError as exc:
        _explain(host.name, exc, io)
        return False
    print(f"{host.name}: signed in as {account or '(unknown account)'}; refresh token stored "
          f"encrypted under {cfg.state_dir}", file=io.out)
    return True


def main(args: argparse.Namespace, io: IO) -> int:
    """Dispatch ``relayd oauth token|authorize [--smarthost NAME]``; 0 ok, 1 failed."""
    cfg = io.config(args)
    hosts = _targets(cfg, getattr(args, "smarthost", None), io)
    if hosts is None:
        return 1
    if args.oauth_command == "authorize":
        if len(hosts) > 1:
            names = ", ".join(h.name for h in hosts)
            print(f"relayd: several smarthosts use xoauth2 ({names}); choose one with "
                  "--smarthost NAME", file=io.err)
            return 1
        return 0 if _authorize(cfg, hosts[0], io) else 1
    ok = True
    for host in hosts:
        ok = asyncio.run(_token(cfg, host, io)) and ok
    return 0 if ok else 1
