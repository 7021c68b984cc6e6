"""What the operator watches: metrics and their endpoint, alerts, the one-click unsubscribe endpoint.

Thin on purpose: each process imports only the modules it runs."""
