"""rlhf: an RLHF platform as gRPC microservices (import name ``rlhf`` maps onto this folder)."""

__version__ = "0.1.0"
