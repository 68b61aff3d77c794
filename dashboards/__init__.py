"""Grafana dashboards as code (issue 6); never imported by the daemon."""
