"""Carries out auto-reload intents through a funding hook.

The decision to reload is taken in SQL, in the transaction that lowered available
credit (see migration 0003); this worker only executes it, in the shape of every
outbox worker (`outbox.py`: LISTEN `tally_reloads`, claim with a lease, backoff). It
calls the funding hook with the intent id as the idempotency key and records the
outcome: a credit on success, a retry with exponential backoff on failure, and
auto-reload turned off after the last attempt. A crash between claim and outcome lets
the lease lapse; the intent is then claimed again with the same key.
"""

import json
import logging
from dataclasses import dataclass
from typing import Protocol

import grpc
from sqlalchemy import text

from tally.v1 import funding_pb2, funding_pb2_grpc
from tally_service import metrics
from tally_service.config import ConfigError, Settings
from tally_service.db import Database
from tally_service.money import format_amount
from tally_service.outbox import OutboxWorker, backoff_seconds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intent:
    intent_id: str
    account_id: str
    amount_micros: int
    attempts: int
    currency: str


class FundingHook(Protocol):
    async def charge(self, intent: Intent) -> str:
        """Charges for the intent; returns the backend's charge id. Raises on failure."""
        ...


class InternalFunding:
    """Internal credits: nothing to charge, the credit is granted at once."""

    async def charge(self, intent: Intent) -> str:
        return f"internal:{intent.intent_id}"


class GrpcFunding:
    """Calls tally.v1.FundingService/Charge on the payments backend."""

    def __init__(self, target: str, timeout_seconds: float) -> None:
        if not target:
            raise ConfigError(["TALLY_FUNDING_TARGET is required with TALLY_FUNDING_HOOK=grpc"])
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = funding_pb2_grpc.FundingServiceStub(self.channel)
        self.timeout_seconds = timeout_seconds

    async def charge(self, intent: Intent) -> str:
        response = await self.stub.Charge(
            funding_pb2.ChargeRequest(
                idempotency_key=intent.intent_id,
                account_id=intent.account_id,
                amount=format_amount(intent.amount_micros),
                currency=intent.currency,
            ),
            timeout=self.timeout_seconds,
        )
        return str(response.charge_id)


def make_hook(settings: Settings) -> FundingHook:
    if settings.funding_hook == "internal":
        return InternalFunding()
    if settings.funding_hook == "grpc":
        return GrpcFunding(settings.funding_target, settings.funding_timeout_seconds)
    raise ConfigError([f"unknown TALLY_FUNDING_HOOK {settings.funding_hook!r}"])


_CLAIM = text(
    "SELECT i.intent_id::text, i.account_id, i.amount, i.attempts, a.currency "
    "FROM tally_claim_reload(:lease) i JOIN accounts a USING (account_id) "
    "WHERE i.intent_id IS NOT NULL"
)
_SUCCEEDED = text("SELECT tally_reload_succeeded(CAST(:intent AS uuid), :charge)")
_FAILED = text("SELECT tally_reload_failed(CAST(:intent AS uuid), :error, :max, :retry)")


class ReloadWorker(OutboxWorker):
    channel = "tally_reloads"
    name = "reload worker"

    def __init__(
        self,
        db: Database,
        hook: FundingHook,
        settings: Settings,
        meters: metrics.Metrics | None = None,
    ) -> None:
        super().__init__(db)
        self.hook = hook
        self.settings = settings
        self.meters = meters

    def backoff_seconds(self, attempts: int) -> float:
        return backoff_seconds(self.settings.reload_backoff_seconds, attempts)

    async def _claim(self) -> Intent | None:
        async with self.db.engine.begin() as conn:
            row = (
                await conn.execute(_CLAIM, {"lease": self.settings.reload_lease_seconds})
            ).first()
        if row is None:
            return None
        return Intent(row[0], row[1], int(row[2]), int(row[3]), row[4])

    async def run_once(self) -> bool:
        """Carries out one due intent; False when none was due."""
        intent = await self._claim()
        if intent is None:
            return False
        try:
            charge_id = await self.hook.charge(intent)
        except Exception as exc:  # the hook is outside the service: any failure retries
            error = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("reload %s attempt %s failed: %s", intent.intent_id, intent.attempts, error)
            async with self.db.engine.begin() as conn:
                outcome = await conn.execute(
                    _FAILED,
                    {
                        "intent": intent.intent_id,
                        "error": (error or type(exc).__name__)[:500],
                        "max": self.settings.reload_max_attempts,
                        "retry": self.backoff_seconds(intent.attempts),
                    },
                )
                recorded = outcome.scalar_one()
                if isinstance(recorded, str):
                    recorded = json.loads(recorded)
                status = recorded["status"]
            if self.meters is not None:
                self.meters.auto_reload_intent("retry" if status == "pending" else status)
            return True
        async with self.db.engine.begin() as conn:
            await conn.execute(_SUCCEEDED, {"intent": intent.intent_id, "charge": charge_id})
        if self.meters is not None:
            self.meters.auto_reload_intent("succeeded")
            self.meters.ledger_entry("credit")
        return True

    def after_pass(self) -> None:
        if self.meters is not None:
            self.meters.reload_worker_last_success.set_to_current_time()
