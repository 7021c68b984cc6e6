"""Process wiring: the daemon assembly, the pipe protocol between its two processes, systemd, logging set-up.

Thin on purpose: each process imports only the modules it runs."""
