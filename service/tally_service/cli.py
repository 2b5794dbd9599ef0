"""`tally`: the server's command line (serve, migrate)."""

import argparse
import logging

from tally_service.config import Settings


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="tally", description="Tally metering service")
    parser.add_argument("--log-level", default="INFO")
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
        import sys

        from tally_service.auth import hash_token

        print(hash_token(sys.stdin.readline().strip()))
        return 0
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings.database_url = args.database_url
    settings.data_dir = args.data_dir
    from tally_service import db, server

    if args.command == "migrate":
        db.migrate(server.resolve_database_url(settings))
        return 0
    settings.listen_address = args.listen
    settings.metrics_address = args.metrics_address
    settings.migrate_on_start = args.migrate
    server.run(settings)
    return 0
