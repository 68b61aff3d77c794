"""Simulated sensors for the demo and tests."""
