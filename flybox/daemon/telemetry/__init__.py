"""Telemetry (DESIGN.md §2, last stage): events, progress and quality, fanned out to MQTT,
Prometheus metrics, the HTTP status API, systemd and the log.
"""
