"""Moving a prompt's KV cache from a prefill worker to a decode worker.

Two roles per request: a `KVSender` on the prefill side turns KV computed layer
by layer into numbered chunks; a `KVReceiver` on the decode side checks the
header and every chunk (request id, sequence number, ranges, byte counts) and
hands verified tensors to the engine. Neither knows the transport: the daemons
carry their messages over the gRPC Prefill stream.
"""
