"""OAuth2 access tokens for XOAUTH2: token source, encrypted store, one module per provider.

Thin on purpose: each process imports only the modules it runs."""
