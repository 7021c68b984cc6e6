"""Entry point for ``python -m relayd``."""

import sys

# The delivery process of ``relayd run`` skips the CLI's argparse (relayd/commands/deliver.py);
# the cheap test first, so that other commands do not import the daemon.
if sys.argv[3:4] == ["_deliver"]:
    from relayd.daemon.pipe import from_argv

    _args = from_argv(sys.argv[1:])
    if _args is not None:
        from relayd.commands.deliver import deliver

        raise SystemExit(deliver(_args))

from relayd.cli import main

raise SystemExit(main())
