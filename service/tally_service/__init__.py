"""Tally: a gRPC metering, credits and ledger service."""
