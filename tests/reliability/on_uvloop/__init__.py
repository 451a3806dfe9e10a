"""Tests that run on uvloop, the event loop `relay serve` uses (see conftest.py here)."""
