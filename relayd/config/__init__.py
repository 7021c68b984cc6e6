"""The configuration file: schema records, the YAML reader, one builder per section, loading.

Thin on purpose: each process imports only the modules it runs."""
