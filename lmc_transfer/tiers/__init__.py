"""Tiers behind the host pool: local disk and a remote Redis/Valkey store, written behind."""
