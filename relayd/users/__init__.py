"""Submission users: who may authenticate on a ``submission:`` listener, as which senders,
within which limits. ``store`` (the users file and password hashes), ``authorize`` (the pure
sender check), ``limits`` (per-user daily cap and rate at delivery)."""
