"""relayd: a local SMTP relay with a durable spool and smarthost delivery."""

__version__ = "0.1.0"
