"""What the sync and async clients share: settings, channel arguments, small helpers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _requests as rq
from ._service_config import service_config_json

DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_ATTEMPTS = 4
#: Default deadline of a streaming call, as a multiple of ``timeout_seconds``.
STREAM_TIMEOUT_FACTOR = 60

#: Call metadata sent with every RPC, e.g. ``[("authorization", "Bearer ...")]``.
Metadata = Sequence[tuple[str, str | bytes]]
#: gRPC channel options, e.g. ``[("grpc.max_receive_message_length", 1 << 24)]``.
ChannelOptions = Sequence[tuple[str, Any]]


def settings(
    timeout_seconds: float, max_attempts: int, metadata: Metadata | None
) -> tuple[float, int, tuple[tuple[str, str | bytes], ...] | None]:
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts!r}")
    md = tuple((k, v) for k, v in metadata) if metadata else None
    return float(timeout_seconds), max_attempts, md


def stream_timeout(timeout_seconds: float, stream_timeout_seconds: float | None) -> float:
    if stream_timeout_seconds is None:
        return timeout_seconds * STREAM_TIMEOUT_FACTOR
    if not stream_timeout_seconds > 0:
        raise ValueError(f"stream_timeout_seconds must be positive, got {stream_timeout_seconds!r}")
    return float(stream_timeout_seconds)


def replayable(events: object) -> bool:
    """Whether a stream's events can be sent again (a list, tuple or other Sequence)."""
    return isinstance(events, Sequence) and not isinstance(events, str | bytes)


def report_format(format: rq.ReportFormatArg, path: Path) -> rq.ReportFormatArg:
    """The format of ``export_usage_report_to``: as given, else from the file suffix."""
    if format is not None:
        return format
    return "csv" if path.suffix.lower() == ".csv" else "xlsx"


def part_path(path: Path) -> Path:
    """Where a report is written before it is renamed to ``path``."""
    return path.with_name(path.name + ".part")


def check_channel_args(target: str | None, channel: Any, credentials: Any) -> str | None:
    if channel is None:
        if not target:
            raise ValueError("give a target (host:port) or a channel")
        return target
    if target or credentials is not None:
        raise ValueError("give either a channel or a target (with credentials), not both")
    return None


def channel_options(options: ChannelOptions | None, max_attempts: int) -> list[tuple[str, Any]]:
    """The channel arguments of a channel the client creates: ``options``, plus the retry
    policy of the shipped service config with ``max_attempts`` (unless ``options`` has a
    ``grpc.service_config`` of its own)."""
    opts = list(options or ())
    names = {name for name, _ in opts}
    if "grpc.service_config" not in names:
        opts.append(("grpc.service_config", service_config_json(max_attempts)))
    if "grpc.enable_retries" not in names:
        opts.append(("grpc.enable_retries", 1 if max_attempts > 1 else 0))
    return opts
