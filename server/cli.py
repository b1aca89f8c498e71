"""The ``den`` command: ``serve`` and ``admin`` for operators, client verbs for users.

Settings are built once here (environment ``DEN_*``, then flags) and passed down.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.client.commands import add_client_commands
from server.config import Settings
from server.errors import DenError


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k) for k in ("host", "port", "ssh_port", "data_dir")
                 if getattr(args, k, None) is not None}
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.serve import serve

    return serve(_settings(args))


def _open_db(settings: Settings, *, migrate: bool) -> object:
    from server.db.migrate import ensure_schema
    from server.db.session import make_engine, make_session_factory, prepare_data_dir

    prepare_data_dir(settings.data_dir)
    url = settings.resolved_database_url()
    engine = make_engine(url)
    ensure_schema(engine, url, auto_migrate=migrate or settings.auto_migrate)
    return make_session_factory(engine)


def cmd_admin_token(args: argparse.Namespace) -> int:
    from server.auth.tokens import ensure_user, issue_token

    sessions = _open_db(_settings(args), migrate=False)
    with sessions.begin() as s:  # type: ignore[attr-defined]
        user = ensure_user(s, args.user, admin=args.admin)
        _row, token = issue_token(s, user, name=args.name or "admin-cli",
                                  expires_in_s=args.expires_in_s)
    print(token)
    return 0


def cmd_admin_migrate(args: argparse.Namespace) -> int:
    _open_db(_settings(args), migrate=True)
    print("den: database schema is up to date")
    return 0


def cmd_admin_rotate_forge_key(args: argparse.Namespace) -> int:
    from server.forges.accounts import rotate_key_file

    settings = _settings(args)
    sessions = _open_db(settings, migrate=False)
    count, what = rotate_key_file(settings, sessions)  # type: ignore[arg-type]
    print(f"den: {what}; {count} forge token(s) re-encrypted")
    return 0


def _server_flags(p: argparse.ArgumentParser, *, listen: bool) -> None:
    if listen:
        p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=int, help="HTTP port (default 8080)")
        p.add_argument("--ssh-port", dest="ssh_port", type=int,
                       help="SSH gateway port (default 2222)")
    p.add_argument("--data-dir", dest="data_dir", type=Path,
                   help="data directory (default /var/lib/den, or DEN_DATA_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="den", description="Den: persistent dev workspaces.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the Den server (HTTP API; reconciles with the engine at start)"
    )
    _server_flags(serve, listen=True)
    serve.set_defaults(func=cmd_serve)

    admin = sub.add_parser("admin", help="operator commands against the data dir / database")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    token = admin_sub.add_parser("token", help="create a user if needed and print a new token")
    token.add_argument("--user", required=True, help="user name")
    token.add_argument("--admin", action="store_true", help="make the user an admin")
    token.add_argument("--name", help="a label for the token")
    token.add_argument("--expires-in-s", type=int, metavar="SECONDS",
                       help="the token stops working this many seconds from now (default: "
                            "never)")
    _server_flags(token, listen=False)
    token.set_defaults(func=cmd_admin_token)
    migrate = admin_sub.add_parser("migrate", help="upgrade the database schema")
    _server_flags(migrate, listen=False)
    migrate.set_defaults(func=cmd_admin_migrate)

    rotate = admin_sub.add_parser(
        "rotate-forge-key",
        help="re-encrypt linked forge tokens with a new key (see docs/forges.md)")
    _server_flags(rotate, listen=False)
    rotate.set_defaults(func=cmd_admin_rotate_forge_key)

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except DenError as exc:
        print(f"den: {exc.message}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
