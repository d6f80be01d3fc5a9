"""Generated protobuf/gRPC code for package rlhf.v1 (``make protos``; do not edit)."""
