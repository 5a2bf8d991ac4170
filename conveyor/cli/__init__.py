"""The `conveyor` command. Package errors and machine faults print as one `error:` line (exit 1), usage errors as
one message with the `--help` hint (exit 2); `--debug` shows the traceback of the former.

`root` holds the app and `main`; each other module adds its commands to the app when imported, in the order
`conveyor --help` lists them. A command imports what it runs inside its own function (the daemon, the trainer,
the dashboard, ...): `conveyor --help`, a usage error and a refusal stay fast and never load torch.
"""

from . import model, tools, training, views  # noqa: F401  (registers the commands, in this order)
from .root import app, main

__all__ = ["app", "main"]
