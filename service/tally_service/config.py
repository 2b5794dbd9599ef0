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
    # host:port of the Prometheus /metrics endpoint (its own port); empty disables it.
    metrics_address: str = field(
        default_factory=lambda: os.environ.get("TALLY_METRICS_ADDRESS", "127.0.0.1:9090")
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
    # The longest a unary call may take on the server (DEADLINE_EXCEEDED after it).
    max_call_seconds: float = field(
        default_factory=lambda: _env_float("TALLY_MAX_CALL_SECONDS", 30.0)
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
    # How auto-reloads are funded: "internal" credits at once (internal credits);
    # "grpc" calls tally.v1.FundingService/Charge at `funding_target`.
    funding_hook: str = field(
        default_factory=lambda: os.environ.get("TALLY_FUNDING_HOOK", "internal")
    )
    funding_target: str = field(default_factory=lambda: os.environ.get("TALLY_FUNDING_TARGET", ""))
    funding_timeout_seconds: float = field(
        default_factory=lambda: _env_float("TALLY_FUNDING_TIMEOUT_SECONDS", 10.0)
    )
    # Funding attempts of one reload before auto-reload is turned off.
    reload_max_attempts: int = field(
        default_factory=lambda: _env_int("TALLY_RELOAD_MAX_ATTEMPTS", 5)
    )
    # First retry delay; doubles per attempt up to 5 minutes.
    reload_backoff_seconds: float = field(
        default_factory=lambda: _env_float("TALLY_RELOAD_BACKOFF_SECONDS", 2.0)
    )
    # How long a worker owns a claimed reload before another may take it over.
    reload_lease_seconds: int = field(
        default_factory=lambda: _env_int("TALLY_RELOAD_LEASE_SECONDS", 30)
    )
    # Group commit: movements per transaction (1 turns grouping off), how long the first
    # of a group may wait for more (0: a group is what arrived while earlier groups were
    # in the database), and groups in the database at once per process.
    group_max_items: int = field(default_factory=lambda: _env_int("TALLY_GROUP_MAX_ITEMS", 64))
    group_max_wait_ms: float = field(
        default_factory=lambda: _env_float("TALLY_GROUP_MAX_WAIT_MS", 0.0)
    )
    group_concurrency: int = field(default_factory=lambda: _env_int("TALLY_GROUP_CONCURRENCY", 4))
    # Apply migrations at start-up (convenient on the embedded database; in production
    # run `tally migrate` as its own step).
    migrate_on_start: bool = field(
        default_factory=lambda: os.environ.get("TALLY_MIGRATE_ON_START", "") in ("1", "true")
    )
