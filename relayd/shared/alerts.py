"""Which node of the fleet sends an alert: one row per (event, key) in PostgreSQL.

A node that meets an outage (``smarthost_down`` for smarthost ``primary``) joins the row: the
first node to fire sends the notice, the others only add their name; each node leaves the row
when the condition ends for it, and the last one to leave sends the recovery, naming every node
that saw the outage. So one outage gives one alert and one recovery for the fleet, however many
nodes met it. The node that notified also sends the 6-hourly reminders.

A node that starts leaves every row (``leave``): it forgot what it had seen, and meets the
outage again if it lasts. A row whose last node left that way ends without a recovery notice,
as a single relay restarted during an outage sends none. Everything here blocks: the alert
sender calls it in a worker thread; ``StateUnavailable`` while the database cannot be reached
(the sender then notifies on its own: an alert sent twice beats one never sent).
"""

from __future__ import annotations

from relayd.shared.db import Conn, SharedDB

_ROW = ("SELECT nodes, seen, notifier FROM relayd_alerts WHERE event = %s AND key = %s "
        "FOR UPDATE")


def _names(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


class FleetAlerts:
    """The fleet's view of the active alerts, for one node (``relayd.control.alerts.Fleet``)."""

    def __init__(self, db: SharedDB) -> None:
        self.db = db
        self.node = db.node

    def fire(self, event: str, key: str, since: float, repeat: bool) -> tuple[bool, tuple[str, ...]]:
        """This node meets the condition: (whether it sends the notice, the nodes so far).
        A ``repeat`` (the reminder) is sent only by the node that notified."""
        me = self.node

        def work(conn: Conn) -> tuple[bool, tuple[str, ...]]:
            # The row exists before it is locked, so that two nodes firing at once queue on it.
            conn.execute("INSERT INTO relayd_alerts (event, key, since, nodes, seen) "
                         "VALUES (%s, %s, %s, '{}', '{}') ON CONFLICT DO NOTHING",
                         (event, key, since))
            row = conn.execute(_ROW, (event, key)).fetchone()
            assert row is not None
            nodes, seen, notifier = _names(row[0]), _names(row[1]), row[2]
            if not nodes:   # a new outage: this node is the first to see it
                conn.execute("UPDATE relayd_alerts SET since = %s, nodes = %s, seen = %s, "
                             "notifier = %s WHERE event = %s AND key = %s",
                             (since, [me], [me], me, event, key))
                return True, (me,)
            nodes += [] if me in nodes else [me]
            seen += [] if me in seen else [me]
            conn.execute("UPDATE relayd_alerts SET nodes = %s, seen = %s "
                         "WHERE event = %s AND key = %s", (nodes, seen, event, key))
            return repeat and notifier == me, tuple(seen)

        return self.db.run(work)

    def clear(self, event: str, key: str) -> tuple[bool, tuple[str, ...]]:
        """The condition ended for this node: (whether it sends the recovery, that is, it
        was the last node to see it; the nodes that saw the outage)."""
        me = self.node

        def work(conn: Conn) -> tuple[bool, tuple[str, ...]]:
            row = conn.execute(_ROW, (event, key)).fetchone()
            if row is None:
                return False, ()
            nodes, seen = _names(row[0]), _names(row[1])
            if me not in nodes:
                return False, tuple(seen)
            nodes.remove(me)
            if nodes:
                conn.execute("UPDATE relayd_alerts SET nodes = %s WHERE event = %s AND key = %s",
                             (nodes, event, key))
                return False, tuple(seen)
            conn.execute("DELETE FROM relayd_alerts WHERE event = %s AND key = %s", (event, key))
            return row[2] is not None, tuple(seen)

        return self.db.run(work)

    def seen(self, event: str, key: str) -> tuple[str, ...]:
        """The nodes that saw the current outage of (event, key) so far."""
        def work(conn: Conn) -> tuple[str, ...]:
            row = conn.execute("SELECT seen FROM relayd_alerts WHERE event = %s AND key = %s",
                               (event, key)).fetchone()
            return () if row is None else tuple(_names(row[0]))

        return self.db.run(work)

    def leave(self) -> None:
        """At start: this node no longer sees anything it saw before."""
        me = self.node

        def work(conn: Conn) -> None:
            conn.execute("UPDATE relayd_alerts SET nodes = array_remove(nodes, %s) "
                         "WHERE %s = ANY(nodes)", (me, me))
            conn.execute("DELETE FROM relayd_alerts WHERE nodes = '{}'")

        self.db.run(work)
