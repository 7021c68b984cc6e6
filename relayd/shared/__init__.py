"""The fleet's shared state in PostgreSQL (``shared_state``): the connection, the schema and
its versions, the do-not-email list, the daily cap, and the import from a single relay.

Only assembled when ``shared_state`` is configured, so only then is psycopg imported.
"""
