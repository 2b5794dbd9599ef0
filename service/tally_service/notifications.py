"""Delivers threshold notifications to the caller's NotificationService.

A crossing is recorded in SQL as a notification row, in the transaction that crossed
the threshold (sql/65_thresholds.sql); this worker only delivers it, in the shape of
every outbox worker (`outbox.py`: LISTEN `tally_notifications`, claim with a lease,
backoff). It calls `tally.v1.NotificationService/Notify` at `TALLY_NOTIFY_TARGET` with
the notification id as the idempotency key, and marks the row delivered on OK; any
failure is retried with exponential backoff, with no last attempt (at least once).
With no target, notifications are recorded and listed but not delivered.
"""

import logging
from dataclasses import dataclass

import grpc
from sqlalchemy import text

from tally.v1 import notification_pb2, notification_pb2_grpc
from tally_service import convert, metrics
from tally_service.config import Settings
from tally_service.db import Database
from tally_service.outbox import OutboxWorker, backoff_seconds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    request: notification_pb2.NotifyRequest
    attempts: int


_CLAIM = text(
    "SELECT n.notification_id::text, n.account_id, n.threshold_id::text, n.metric, "
    "n.observed, n.fire_at, n.crossed_at, n.period_start, n.attempts "
    "FROM tally_claim_notification(:lease) n WHERE n.notification_id IS NOT NULL"
)
_DELIVERED = text("SELECT tally_notification_delivered(CAST(:id AS uuid))")
_FAILED = text("SELECT tally_notification_failed(CAST(:id AS uuid), :error, :retry)")


class NotificationWorker(OutboxWorker):
    channel = "tally_notifications"
    name = "notification worker"

    def __init__(
        self, db: Database, settings: Settings, meters: metrics.Metrics | None = None
    ) -> None:
        super().__init__(db)
        self.settings = settings
        self.meters = meters
        self.channel_to_target = grpc.aio.insecure_channel(settings.notify_target)
        self.stub = notification_pb2_grpc.NotificationServiceStub(self.channel_to_target)

    async def _claim(self) -> Claimed | None:
        async with self.db.engine.begin() as conn:
            row = (
                await conn.execute(_CLAIM, {"lease": self.settings.notify_lease_seconds})
            ).first()
        if row is None:
            return None
        metric = row[3]
        request = notification_pb2.NotifyRequest(
            notification_id=row[0],
            account_id=row[1],
            threshold_id=row[2],
            kind=convert.THRESHOLD_METRICS[metric],
            observed=convert.metric_value(metric, int(row[4])),
            threshold=convert.metric_value(metric, int(row[5])),
            crossed_at=convert.timestamp(row[6]),
            period_start=convert.timestamp(row[7]),
        )
        return Claimed(request, int(row[8]))

    async def run_once(self) -> bool:
        claimed = await self._claim()
        if claimed is None:
            return False
        notification_id = claimed.request.notification_id
        try:
            await self.stub.Notify(claimed.request, timeout=self.settings.notify_timeout_seconds)
        except Exception as exc:  # the hook is outside the service: any failure retries
            error = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning(
                "notification %s attempt %s failed: %s", notification_id, claimed.attempts, error
            )
            async with self.db.engine.begin() as conn:
                await conn.execute(
                    _FAILED,
                    {
                        "id": notification_id,
                        "error": (error or type(exc).__name__)[:500],
                        "retry": backoff_seconds(
                            self.settings.notify_backoff_seconds, claimed.attempts
                        ),
                    },
                )
            if self.meters is not None:
                self.meters.notifications.labels("retry").inc()
            return True
        async with self.db.engine.begin() as conn:
            await conn.execute(_DELIVERED, {"id": notification_id})
        if self.meters is not None:
            self.meters.notifications.labels("delivered").inc()
        return True

    def after_pass(self) -> None:
        if self.meters is not None:
            self.meters.notification_worker_last_success.set_to_current_time()
