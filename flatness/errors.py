"""The project's user-facing exception type."""

from __future__ import annotations


class FlatnessError(Exception):
    """A mistake in what the user asked for (bad file, bad flag value, ...).

    The CLI turns it into one line ``error: <message>`` on stderr and exit
    status 2, without a traceback (set ``FLATNESS_DEBUG=1`` to see one).
    Library code raises it for conditions the user can fix; programming
    errors stay ``ValueError`` / ``TypeError``.
    """
