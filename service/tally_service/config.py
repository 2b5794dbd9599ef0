"""Settings from environment variables (TALLY_*), overridable by command-line flags."""

import os
from dataclasses import dataclass, field


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass
class Settings:
    # PostgreSQL URL (postgresql://user:password@host:port/db). Empty: an embedded
    # PostgreSQL (pgserver) is started with its data under `data_dir`.
    database_url: str = field(default_factory=lambda: os.environ.get("TALLY_DATABASE_URL", ""))
    data_dir: str = field(default_factory=lambda: os.environ.get("TALLY_DATA_DIR", ".tally-data"))
    listen_address: str = field(
        default_factory=lambda: os.environ.get("TALLY_LISTEN_ADDRESS", "127.0.0.1:50051")
    )
    db_pool_size: int = field(default_factory=lambda: _env_int("TALLY_DB_POOL_SIZE", 10))
    db_statement_timeout_ms: int = field(
        default_factory=lambda: _env_int("TALLY_DB_STATEMENT_TIMEOUT_MS", 5000)
    )
    shutdown_grace_seconds: float = field(
        default_factory=lambda: _env_float("TALLY_SHUTDOWN_GRACE_SECONDS", 20.0)
    )
    sweep_interval_seconds: float = field(
        default_factory=lambda: _env_float("TALLY_SWEEP_INTERVAL_SECONDS", 5.0)
    )
    max_message_bytes: int = field(
        default_factory=lambda: _env_int("TALLY_MAX_MESSAGE_BYTES", 4 * 1024 * 1024)
    )
    max_concurrent_rpcs: int = field(
        default_factory=lambda: _env_int("TALLY_MAX_CONCURRENT_RPCS", 1000)
    )
    # Usage events may be dated this far in the past (backdating window).
    usage_backdate_days: int = field(
        default_factory=lambda: _env_int("TALLY_USAGE_BACKDATE_DAYS", 35)
    )
    # Longest range of ListUsageEvents (the Usage Report document allows 7 days).
    usage_list_max_days: int = field(
        default_factory=lambda: _env_int("TALLY_USAGE_LIST_MAX_DAYS", 7)
    )
    # Longest range of ExportUsageReport.
    usage_export_max_days: int = field(
        default_factory=lambda: _env_int("TALLY_USAGE_EXPORT_MAX_DAYS", 366)
    )
    # Apply migrations at start-up (convenient on the embedded database; in production
    # run `tally migrate` as its own step).
    migrate_on_start: bool = field(
        default_factory=lambda: os.environ.get("TALLY_MIGRATE_ON_START", "") in ("1", "true")
    )
