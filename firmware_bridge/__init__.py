"""Microcontroller bridge protocol, codec, transport and emulator (issue 3)."""
