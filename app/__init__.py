"""Graft's web tier. Never imports torch."""
