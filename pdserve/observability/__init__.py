"""Observability: one OpenTelemetry trace per request, and per-daemon metrics.

- `pdserve.observability.tracing`: tracing set up from the standard `OTEL_*`
  environment variables (off unless `OTEL_TRACES_EXPORTER` or the test-only
  `PDSERVE_TRACE_FILE` is set), span helpers that cost nothing when off, and W3C
  trace-context propagation through gRPC metadata. Imports only opentelemetry-api
  at import time, so the client SDK can use the propagation helpers.
- `pdserve.observability.metrics`: OpenTelemetry instruments under the `pdserve_`
  prefix, exposed in the Prometheus text format on `--metrics-port` (`/metrics`).

This package imports neither torch nor grpc, and importing it imports neither
submodule.
"""
