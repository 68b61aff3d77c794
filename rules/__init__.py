"""Local alert rules, alert lifecycle and notification delivery (issue 4)."""
