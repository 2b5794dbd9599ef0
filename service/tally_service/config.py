"""Settings from environment variables (TALLY_*), overridable by command-line flags.

``Settings.from_env()`` reads and checks every variable at once and raises
:class:`ConfigError` with one line per problem (the variable, what it holds, what it
accepts); ``tally`` prints those lines and exits with code 2, before anything starts.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
FUNDING_HOOKS = ("internal", "grpc")
DATABASE_SCHEMES = ("postgres", "postgresql", "postgresql+asyncpg")
# The Prometheus exporter port of the OpenTelemetry convention (Prometheus itself is 9090).
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"
# TALLY_* names read by tooling, not by the server (scripts/, tests).
_TOOLING_PREFIXES = ("TALLY_TEST_", "TALLY_IMAGE", "TALLY_BASE_IMAGE", "TALLY_BUILD_")


class ConfigError(Exception):
    """Settings that cannot be used; ``problems`` holds one line per variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_bool(text: str) -> bool | None:
    """The usual spellings of a boolean (case-insensitive); None when it is none of them."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def check_address(text: str) -> str | None:
    """Why ``host:port`` (or ``[v6]:port``) is not a listen address; None when it is."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return "expected host:port, e.g. 127.0.0.1:50051, 0.0.0.0:50051 or [::]:50051"
    if not 1 <= int(port) <= 65535:
        return "the port must be between 1 and 65535"
    if host.startswith("[") != host.endswith("]"):
        return "an IPv6 host goes in brackets, e.g. [::1]:50051"
    return None


class _Reader:
    """Reads variables from `env`, collecting a problem line for each bad one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.names: set[str] = set()

    def _raw(self, name: str) -> str | None:
        self.names.add(name)
        value = self.env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def _bad(self, name: str, value: str, accepted: str) -> None:
        self.problems.append(f"{name}={value!r} is not valid: expected {accepted}")

    def string(self, name: str, default: str = "") -> str:
        self.names.add(name)
        return self.env.get(name, default)

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        accepted = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum else "")
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            self._bad(name, raw, accepted)
            return default
        if value < minimum or (maximum is not None and value > maximum):
            self._bad(name, raw, accepted)
            return default
        return value

    def number(self, name: str, default: float, minimum: float, exclusive: bool = False) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        accepted = f"a number {'>' if exclusive else '>='} {minimum:g} (seconds)"
        try:
            value = float(raw)
        except ValueError:
            self._bad(name, raw, accepted)
            return default
        if value != value or value in (float("inf"), float("-inf")):  # NaN, infinity
            self._bad(name, raw, accepted)
            return default
        if value < minimum or (exclusive and value == minimum):
            self._bad(name, raw, accepted)
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        value = parse_bool(raw)
        if value is None:
            self._bad(name, raw, "a boolean: 1/0, true/false, yes/no or on/off")
            return default
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...], upper: bool = False) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            self._bad(name, raw, "one of " + ", ".join(choices) + " (case-insensitive)")
            return default
        return value

    def address(self, name: str, default: str, may_be_empty: bool = False) -> str:
        self.names.add(name)
        raw = self.env.get(name)
        if raw is None:
            return default
        raw = raw.strip()
        if raw == "" and may_be_empty:
            return ""
        problem = check_address(raw)
        if problem is not None:
            if may_be_empty:
                problem += " (empty: off)"
            self.problems.append(f"{name}={raw!r} is not valid: {problem}")
            return default
        return raw

    def readable_file(self, name: str) -> str:
        path = self.string(name).strip()
        if path and not os.path.isfile(path):
            self.problems.append(f"{name}={path!r} is not valid: no such file")
        elif path and not os.access(path, os.R_OK):
            self.problems.append(f"{name}={path!r} is not valid: the file is not readable")
        return path


@dataclass
class Settings:
    # PostgreSQL URL (postgresql://user:password@host:port/db). Empty: an embedded
    # PostgreSQL (pgserver) is started with its data under `data_dir`.
    database_url: str = ""
    data_dir: str = ".tally-data"
    listen_address: str = "127.0.0.1:50051"
    # host:port of the Prometheus /metrics endpoint (its own port); empty disables it.
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    # host:port of a plaintext gRPC server with the health service only (for Kubernetes'
    # probes when the main port speaks TLS); empty: health is on the main port only.
    health_address: str = ""
    db_pool_size: int = 10
    db_statement_timeout_ms: int = 5000
    shutdown_grace_seconds: float = 20.0
    sweep_interval_seconds: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    # The longest a unary call may take on the server (DEADLINE_EXCEEDED after it).
    max_call_seconds: float = 30.0
    max_concurrent_rpcs: int = 1000
    # Usage events may be dated this far in the past (backdating window).
    usage_backdate_days: int = 35
    # Longest range of ListUsageEvents (the Usage Report document allows 7 days).
    usage_list_max_days: int = 7
    # Longest range of ExportUsageReport.
    usage_export_max_days: int = 366
    # How auto-reloads are funded: "internal" credits at once (internal credits);
    # "grpc" calls tally.v1.FundingService/Charge at `funding_target`.
    funding_hook: str = "internal"
    funding_target: str = ""
    funding_timeout_seconds: float = 10.0
    # Funding attempts of one reload before auto-reload is turned off.
    reload_max_attempts: int = 5
    # First retry delay; doubles per attempt up to 5 minutes.
    reload_backoff_seconds: float = 2.0
    # How long a worker owns a claimed reload before another may take it over.
    reload_lease_seconds: int = 30
    # Where threshold notifications are delivered (tally.v1.NotificationService,
    # host:port); empty: recorded and listable, not delivered.
    notify_target: str = ""
    notify_timeout_seconds: float = 10.0
    # First retry delay of a failed delivery; doubles per attempt up to 5 minutes.
    notify_backoff_seconds: float = 2.0
    # How long a worker owns a claimed notification before another may take it over.
    notify_lease_seconds: int = 30
    # Group commit: movements per transaction (1 turns grouping off), how long the first
    # of a group may wait for more (0: a group is what arrived while earlier groups were
    # in the database), and groups in the database at once per process (per lane; one:
    # classic group commit, docs/design.md).
    group_max_items: int = 64
    group_max_wait_ms: float = 0.0
    group_concurrency: int = 1
    # Apply migrations at start-up (convenient on the embedded database; in production
    # run `tally migrate` as its own step).
    migrate_on_start: bool = False
    # Logging: the threshold, and "text" (one readable line) or "json" (one object a line).
    log_level: str = "INFO"
    log_format: str = "text"
    # One log line per RPC (method, code, duration_ms, caller).
    access_log: bool = False
    # TLS files (cert and key together; a client CA requires client certificates).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Bearer-token callers, as JSON or in a JSON file (checked by auth.load_callers).
    auth_tokens: str = ""
    auth_tokens_file: str = ""
    # gRPC connections (see server.grpc_options and README, Connections): the server pings
    # an idle connection every keepalive_time_ms and closes it without an answer within
    # keepalive_timeout_ms; it ends every connection after max_connection_age_ms (jittered
    # by +-10%; 0: never), letting its calls finish for max_connection_age_grace_ms, so
    # clients reconnect and reach new replicas; clients may ping every min_ping_interval_ms
    # (also without calls when keepalive_permit_without_calls) before being told to go away.
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    max_connection_age_ms: int = 300_000
    max_connection_age_grace_ms: int = 60_000
    min_ping_interval_ms: int = 10_000
    keepalive_permit_without_calls: bool = True
    # Unknown TALLY_* variables found (probably misspelt); warned about at start.
    unknown_variables: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Every TALLY_* setting, checked; raises ConfigError listing every problem."""
        env = os.environ if env is None else env
        r = _Reader(env)
        s = cls(
            database_url=r.string("TALLY_DATABASE_URL").strip(),
            data_dir=r.string("TALLY_DATA_DIR", ".tally-data").strip() or ".tally-data",
            listen_address=r.address("TALLY_LISTEN_ADDRESS", "127.0.0.1:50051"),
            metrics_address=r.address(
                "TALLY_METRICS_ADDRESS", DEFAULT_METRICS_ADDRESS, may_be_empty=True
            ),
            health_address=r.address("TALLY_HEALTH_ADDRESS", "", may_be_empty=True),
            db_pool_size=r.integer("TALLY_DB_POOL_SIZE", 10, 1, 1000),
            db_statement_timeout_ms=r.integer("TALLY_DB_STATEMENT_TIMEOUT_MS", 5000, 0),
            shutdown_grace_seconds=r.number("TALLY_SHUTDOWN_GRACE_SECONDS", 20.0, 0),
            sweep_interval_seconds=r.number("TALLY_SWEEP_INTERVAL_SECONDS", 5.0, 0, True),
            max_message_bytes=r.integer("TALLY_MAX_MESSAGE_BYTES", 4 * 1024 * 1024, 1024),
            max_call_seconds=r.number("TALLY_MAX_CALL_SECONDS", 30.0, 0, True),
            max_concurrent_rpcs=r.integer("TALLY_MAX_CONCURRENT_RPCS", 1000, 1),
            usage_backdate_days=r.integer("TALLY_USAGE_BACKDATE_DAYS", 35, 0),
            usage_list_max_days=r.integer("TALLY_USAGE_LIST_MAX_DAYS", 7, 1),
            usage_export_max_days=r.integer("TALLY_USAGE_EXPORT_MAX_DAYS", 366, 1),
            funding_hook=r.choice("TALLY_FUNDING_HOOK", "internal", FUNDING_HOOKS),
            funding_target=r.string("TALLY_FUNDING_TARGET").strip(),
            funding_timeout_seconds=r.number("TALLY_FUNDING_TIMEOUT_SECONDS", 10.0, 0, True),
            reload_max_attempts=r.integer("TALLY_RELOAD_MAX_ATTEMPTS", 5, 1),
            reload_backoff_seconds=r.number("TALLY_RELOAD_BACKOFF_SECONDS", 2.0, 0, True),
            reload_lease_seconds=r.integer("TALLY_RELOAD_LEASE_SECONDS", 30, 1),
            notify_target=r.string("TALLY_NOTIFY_TARGET").strip(),
            notify_timeout_seconds=r.number("TALLY_NOTIFY_TIMEOUT_SECONDS", 10.0, 0, True),
            notify_backoff_seconds=r.number("TALLY_NOTIFY_BACKOFF_SECONDS", 2.0, 0, True),
            notify_lease_seconds=r.integer("TALLY_NOTIFY_LEASE_SECONDS", 30, 1),
            group_max_items=r.integer("TALLY_GROUP_MAX_ITEMS", 64, 1, 1000),
            group_max_wait_ms=r.number("TALLY_GROUP_MAX_WAIT_MS", 0.0, 0),
            group_concurrency=r.integer("TALLY_GROUP_CONCURRENCY", 1, 1, 64),
            migrate_on_start=r.boolean("TALLY_MIGRATE_ON_START", False),
            log_level=r.choice("TALLY_LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
            log_format=r.choice("TALLY_LOG_FORMAT", "text", LOG_FORMATS),
            access_log=r.boolean("TALLY_ACCESS_LOG", False),
            tls_cert_file=r.readable_file("TALLY_TLS_CERT_FILE"),
            tls_key_file=r.readable_file("TALLY_TLS_KEY_FILE"),
            tls_client_ca_file=r.readable_file("TALLY_TLS_CLIENT_CA_FILE"),
            auth_tokens=r.string("TALLY_AUTH_TOKENS").strip(),
            auth_tokens_file=r.readable_file("TALLY_AUTH_TOKENS_FILE"),
            keepalive_time_ms=r.integer("TALLY_KEEPALIVE_TIME_MS", 60_000, 1000),
            keepalive_timeout_ms=r.integer("TALLY_KEEPALIVE_TIMEOUT_MS", 20_000, 100),
            max_connection_age_ms=r.integer("TALLY_MAX_CONNECTION_AGE_MS", 300_000, 0),
            max_connection_age_grace_ms=r.integer("TALLY_MAX_CONNECTION_AGE_GRACE_MS", 60_000, 0),
            min_ping_interval_ms=r.integer("TALLY_KEEPALIVE_MIN_PING_INTERVAL_MS", 10_000, 0),
            keepalive_permit_without_calls=r.boolean("TALLY_KEEPALIVE_PERMIT_WITHOUT_CALLS", True),
        )
        problems = r.problems
        if s.database_url:
            scheme = urlsplit(s.database_url).scheme
            if scheme not in DATABASE_SCHEMES:
                problems.append(
                    f"TALLY_DATABASE_URL has the scheme {scheme!r}: expected a PostgreSQL URL, "
                    "postgresql://user:password@host:5432/db (or empty: embedded PostgreSQL)"
                )
        if s.funding_hook == "grpc" and not s.funding_target:
            problems.append("TALLY_FUNDING_TARGET is required with TALLY_FUNDING_HOOK=grpc")
        if s.funding_target and check_address(s.funding_target) is not None:
            problems.append(
                f"TALLY_FUNDING_TARGET={s.funding_target!r} is not valid: expected host:port"
            )
        if bool(s.tls_cert_file) != bool(s.tls_key_file):
            problems.append("TLS needs both TALLY_TLS_CERT_FILE and TALLY_TLS_KEY_FILE")
        if s.tls_client_ca_file and not s.tls_cert_file:
            problems.append("TALLY_TLS_CLIENT_CA_FILE needs TALLY_TLS_CERT_FILE and _KEY_FILE")
        if s.auth_tokens and s.auth_tokens_file:
            problems.append("set TALLY_AUTH_TOKENS or TALLY_AUTH_TOKENS_FILE, not both")
        if problems:
            raise ConfigError(problems)
        s.unknown_variables = sorted(
            name
            for name in env
            if name.startswith("TALLY_")
            and name not in r.names
            and not name.startswith(_TOOLING_PREFIXES)
        )
        return s
