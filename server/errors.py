"""Errors that carry a message for the person at the terminal.

`BadInput` is a problem the user can fix (a missing file, a taken port, an
unbuilt toolchain): its text is one line naming the problem and the fix, and the
CLI turns it into exit code 2 without a traceback. Everything else is a fault.
"""


class BadInput(Exception):
    """A problem with what the user gave or set up; the message says the fix."""


class ToolchainMissing(BadInput):
    """The llama.cpp binaries or converters are not built yet."""


class BadModelFile(BadInput):
    """A model file is missing, truncated or not what its name says."""


class PortInUse(BadInput):
    """The requested port is already taken."""


class ServerStartError(Exception):
    """The inference server did not come up; the message holds its log tail."""


class ServerCrashed(Exception):
    """A managed server kept failing after every restart allowed; the message names its log."""


class ServerUnavailable(Exception):
    """No endpoint answered a request after all retries."""


class ToolFailed(Exception):
    """A llama.cpp tool (converter, quantizer) failed; the message is its own error text."""
