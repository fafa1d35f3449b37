"""The router's pure logic: the worker registry (registration, heartbeats, health) and
the placement policy that picks a decode worker and ordered prefill candidates.

No grpc, protobuf, asyncio or torch here: the router daemon converts messages at its
edge and calls these classes, and tests drive them with a fake clock.
"""
