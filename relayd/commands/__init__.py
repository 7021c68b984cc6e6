"""The CLI's commands, one module each (relayd/cli.py parses argv and dispatches here).

Thin on purpose: each process imports only the modules it runs."""
