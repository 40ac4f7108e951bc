"""What an operator sees of a running server: Prometheus metrics, OpenTelemetry traces, JSON
logs. A foundation: every layer records into it, it imports nothing of k2serve's above it."""
