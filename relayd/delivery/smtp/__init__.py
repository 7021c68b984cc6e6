"""The SMTP client to smarthosts: connection pool, connection, AUTH, replies, the outbox.

Thin on purpose: each process imports only the modules it runs."""
