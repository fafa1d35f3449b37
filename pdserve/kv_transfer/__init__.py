"""Moving a prompt's KV cache from a prefill worker to a decode worker.

Roles: a `sender.KVSender` on the prefill side turns KV computed layer by layer into numbered
chunks; a `receiver.KVReceiver` on the decode side checks the header, the skip and every chunk
before any tensor reaches the cache; `transport.pull` drives one transfer over a `KVSource`.
Backends: `grpc_stream` (the bidirectional Prefill call, with the hand-made chunk codec in
`codec`) and `in_process` (a queue, for tests and tools). The protocol's constants and byte
arithmetic are in `protocol`.
"""
