"""The accepting side's SMTP server: the listener and its command-line framing.

Thin on purpose: each process imports only the modules it runs."""
