"""p2ppay: secure person-to-person micropayments over TLS, on Trio."""

__version__ = "0.1.0"
