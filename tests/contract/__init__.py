"""Contracts shared by tiers: each runs against an in-memory fake (unit tier) and the real adapter."""
