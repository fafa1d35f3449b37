"""Generated gRPC stubs of the pdserve.v1 API (run scripts/gen_protos.py; do not edit)."""
