"""What a running plane shows the outside: its statistics as Prometheus metrics
(``metrics``) and a Unix socket that serves them with ``plane.stats()`` (``stats_server``).
Telemetry reads the plane; the plane knows nothing of it.
"""
