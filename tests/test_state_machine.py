"""A property-based test of the credits state machine against a simple model.

Hypothesis drives random sequences of top-ups, debits, adjustments, reserves, captures,
releases and retries against the real server; after every step the server's balance
must equal the model's and VerifyAccount must hold.
"""

import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from tally_client import InsufficientCredits, ReservationNotPending, TallyClient
from tests.support import assert_consistent, scaled

MICRO = Decimal("0.000001")
amounts = st.integers(min_value=1, max_value=50_000_000)  # micro-credits, up to 50


def wire(micros: int) -> str:
    return str((Decimal(micros) * MICRO).normalize().quantize(MICRO)).rstrip("0").rstrip(".")


@dataclass
class Model:
    balance: int = 0
    holds: dict[str, int] = field(default_factory=dict)  # pending: reservation -> amount

    @property
    def reserved(self) -> int:
        return sum(self.holds.values())

    @property
    def available(self) -> int:
        return self.balance - self.reserved


class CreditsMachine(RuleBasedStateMachine):
    client: TallyClient  # set by the test below
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.account = f"sm-{uuid.uuid4().hex[:12]}"
        self.last: tuple[str, Any, Any] | None = None  # (method, kwargs, response)

    @initialize()
    def create(self) -> None:
        self.client.create_account(self.account)
        self.product = f"sm-{self.account}"
        self.client.upsert_product(self.product, "0.5")  # 500,000 micro-credits a unit

    @rule(
        amount=amounts,
        grant_type=st.sampled_from(["purchased", "promotional", "subscription"]),
        priority=st.integers(min_value=0, max_value=1000),
    )
    def grant(self, amount: int, grant_type: str, priority: int) -> None:
        self._call(
            "top_up",
            account_id=self.account,
            amount=wire(amount),
            grant_type=grant_type,
            priority=priority,
        )
        self.model.balance += amount

    @rule(quantity=st.integers(min_value=0, max_value=40))
    def usage(self, quantity: int) -> None:
        charge = 500_000 * quantity
        event_id = str(uuid.uuid4())
        # The balance rule applies to a charge; a zero charge moves nothing and needs no
        # credit (DESIGN.md 4 and 6: an uncharged event links to no entry), even when
        # available credit is already negative.
        if charge > 0 and charge > self.model.available:
            try:
                self.client.record_usage(self.account, event_id, self.product, quantity=quantity)
            except InsufficientCredits:
                return
            raise AssertionError("usage beyond available credit was charged")
        recorded = self.client.record_usage(self.account, event_id, self.product, quantity=quantity)
        assert Decimal(recorded.event.credits) == Decimal(charge) * MICRO
        again = self.client.record_usage(self.account, event_id, self.product, quantity=quantity)
        assert again.duplicate and again.event == recorded.event
        self.model.balance -= charge

    def _call(self, method: str, **kwargs: Any) -> Any:
        kwargs["request_id"] = str(uuid.uuid4())
        response = getattr(self.client, method)(**kwargs)
        self.last = (method, kwargs, response)
        return response

    @rule(amount=amounts)
    def top_up(self, amount: int) -> None:
        entry = self._call("top_up", account_id=self.account, amount=wire(amount))
        self.model.balance += amount
        assert Decimal(entry.balance_after) == Decimal(self.model.balance) * MICRO

    @rule(amount=amounts)
    def debit(self, amount: int) -> None:
        if amount > self.model.available:
            try:
                self._call("debit", account_id=self.account, amount=wire(amount))
            except InsufficientCredits:
                return
            raise AssertionError("debit beyond available credit succeeded")
        self._call("debit", account_id=self.account, amount=wire(amount))
        self.model.balance -= amount

    @rule(amount=amounts, negative=st.booleans())
    def adjust(self, amount: int, negative: bool) -> None:
        signed = -amount if negative else amount
        self._call("adjust", account_id=self.account, amount=wire(signed), reason="test")
        self.model.balance += signed

    @rule(target=holds, amount=amounts)
    def reserve(self, amount: int) -> str:
        if amount > self.model.available:
            try:
                self._call("reserve", account_id=self.account, amount=wire(amount))
            except InsufficientCredits:
                return ""
            raise AssertionError("reserve beyond available credit succeeded")
        hold = self._call("reserve", account_id=self.account, amount=wire(amount), ttl_seconds=3600)
        self.model.holds[hold.reservation_id] = amount
        return str(hold.reservation_id)

    @rule(hold=consumes(holds), fraction=st.integers(min_value=1, max_value=100))
    def capture(self, hold: str, fraction: int) -> None:
        if hold not in self.model.holds:
            return
        amount = max(1, self.model.holds[hold] * fraction // 100)
        self._call("capture", reservation_id=hold, amount=wire(amount))
        del self.model.holds[hold]
        self.model.balance -= amount

    @rule(hold=consumes(holds))
    def release(self, hold: str) -> None:
        if hold not in self.model.holds:
            return
        self._call("release", reservation_id=hold)
        del self.model.holds[hold]

    @rule(hold=holds)
    def finished_hold_refuses_capture(self, hold: str) -> None:
        if not hold or hold in self.model.holds:
            return
        try:
            self.client.capture(hold)
        except ReservationNotPending:
            return
        raise AssertionError("a finished hold was captured again")

    @rule()
    def retry_last(self) -> None:
        if self.last is None:
            return
        method, kwargs, response = self.last
        assert getattr(self.client, method)(**kwargs) == response

    @invariant()
    def matches_model(self) -> None:
        if self.last is None:
            return
        balance = self.client.get_balance(self.account)
        assert Decimal(balance.balance) == Decimal(self.model.balance) * MICRO
        assert Decimal(balance.reserved) == Decimal(self.model.reserved) * MICRO
        assert Decimal(balance.available) == Decimal(self.model.available) * MICRO
        assert_consistent(self.client, self.account)


def test_credits_state_machine(client: TallyClient) -> None:
    CreditsMachine.client = client
    runner = CreditsMachine.TestCase
    runner.settings = settings(
        max_examples=scaled(20),
        stateful_step_count=25 if scaled(1) == 1 else 100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    runner().runTest()


def test_zero_charge_usage_needs_no_credit(client: TallyClient) -> None:
    """The sequence a fresh clone's state machine found: create, adjust -0.000001, usage
    of quantity 0. Available credit is negative, but a zero charge needs none: the event
    is recorded uncharged, with no entry, and nothing moves."""
    account = f"sm-{uuid.uuid4().hex[:12]}"
    product = f"sm-{account}"
    client.create_account(account)
    client.upsert_product(product, "0.5")
    client.adjust(account, "-0.000001", "test")
    recorded = client.record_usage(account, str(uuid.uuid4()), product, quantity=0)
    assert recorded.event.credits == "0" and not recorded.HasField("entry")
    assert recorded.event.entry_id == 0
    balance = client.get_balance(account)
    assert (balance.balance, balance.available) == ("-0.000001", "-0.000001")
    with pytest.raises(InsufficientCredits):
        client.record_usage(account, str(uuid.uuid4()), product, quantity=1)
    assert_consistent(client, account)
