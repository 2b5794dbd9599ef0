"""`tally`: the server's command line (serve, migrate, hash-token).

Settings come from TALLY_* variables (config.py), checked before anything starts: a
bad value prints one line per problem and exits with code 2; an address that cannot be
listened on prints one line and exits with code 1. Neither prints a traceback.
"""

import argparse
import logging
import os
import sys

# gRPC's C core logs (to standard error, unstructured) only errors, unless asked otherwise;
# read when grpc is first imported, which is below.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from tally_service import logs
from tally_service.config import LOG_LEVELS, ConfigError, Settings, check_address

EXIT_CONFIG = 2
EXIT_STARTUP = 1


def _fail(lines: list[str], code: int) -> int:
    for line in lines:
        print(f"tally: {line}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        return _fail(exc.problems, EXIT_CONFIG)
    parser = argparse.ArgumentParser(prog="tally", description="Tally metering service")
    parser.add_argument(
        "--log-level",
        default=settings.log_level,
        type=str.upper,
        choices=LOG_LEVELS,
        help="logging threshold (TALLY_LOG_LEVEL)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--listen",
        default=settings.listen_address,
        help="host:port to listen on (TALLY_LISTEN_ADDRESS)",
    )
    serve.add_argument(
        "--metrics-address",
        default=settings.metrics_address,
        help="host:port of the Prometheus /metrics endpoint; empty: off (TALLY_METRICS_ADDRESS)",
    )
    serve.add_argument(
        "--database-url",
        default=settings.database_url,
        help="PostgreSQL URL (TALLY_DATABASE_URL); empty: embedded PostgreSQL",
    )
    serve.add_argument(
        "--data-dir",
        default=settings.data_dir,
        help="where the embedded PostgreSQL keeps its data (TALLY_DATA_DIR)",
    )
    serve.add_argument(
        "--migrate",
        action="store_true",
        default=settings.migrate_on_start,
        help="apply migrations before serving (TALLY_MIGRATE_ON_START)",
    )

    migrate = commands.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("--database-url", default=settings.database_url)
    migrate.add_argument("--data-dir", default=settings.data_dir)

    commands.add_parser(
        "hash-token",
        help="print the SHA-256 of a bearer token read from standard input (for TALLY_AUTH_TOKENS)",
    )

    args = parser.parse_args(argv)
    if args.command == "hash-token":
        from tally_service.auth import hash_token

        print(hash_token(sys.stdin.readline().strip()))
        return 0
    logs.setup(args.log_level, settings.log_format)
    settings.log_level = args.log_level
    settings.database_url = args.database_url
    settings.data_dir = args.data_dir
    for name in settings.unknown_variables:
        logging.getLogger("tally_service.config").warning("unknown setting %s: ignored", name)
    from tally_service import auth, db, server, tls

    if args.command == "migrate":
        db.migrate(server.resolve_database_url(settings))
        return 0
    problems = [
        f"{flag} {value!r} is not valid: {problem}"
        for flag, value, problem in (
            ("--listen", args.listen, check_address(args.listen)),
            (
                "--metrics-address",
                args.metrics_address,
                check_address(args.metrics_address) if args.metrics_address else None,
            ),
        )
        if problem is not None
    ]
    try:
        auth.load_callers(settings.auth_tokens, settings.auth_tokens_file)
    except ConfigError as exc:
        problems.extend(exc.problems)
    tls_files = tls.TlsFiles.from_settings(settings)
    if tls_files is not None and not problems:
        try:
            tls.CertificateReloader(tls_files)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            problems.append(f"TALLY_TLS_CERT_FILE and TALLY_TLS_KEY_FILE cannot be used: {exc}")
    if problems:
        return _fail(problems, EXIT_CONFIG)
    settings.listen_address = args.listen
    settings.metrics_address = args.metrics_address
    settings.migrate_on_start = args.migrate
    try:
        server.check_addresses(settings)
        server.run(settings)
    except ConfigError as exc:
        return _fail(exc.problems, EXIT_CONFIG)
    except server.StartupError as exc:
        return _fail([str(exc)], EXIT_STARTUP)
    return 0
