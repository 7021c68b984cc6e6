"""The durable queue on disk: the store, its records, batched writes, reusable files, scans.

Thin on purpose: each process imports only the modules it runs."""
