"""The delivering side: queue manager, schedule, backoff, smarthost health, limits, outcomes, log line.

Thin on purpose: each process imports only the modules it runs."""
