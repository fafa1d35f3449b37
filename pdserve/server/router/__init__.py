"""pdserve-router: the client-facing daemon (gRPC and the OpenAI-compatible HTTP API), its worker membership and API keys; the policies it applies are in `pdserve.routing`."""
