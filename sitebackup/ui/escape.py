"""The one escaping of untrusted text (file and blob names, paths, error messages) for terminals and logs.

A name may hold ESC, BEL, CR or LF: printed raw it could retitle the terminal, redraw lines or fake a
``FAILED`` line in cron mail and log files. ``printable`` turns every character Python does not call
printable into its escape (``\\x1b``, ``\\n``, ``\\u202e``), so one record stays one line; the rich
printer also never reads data as markup.
"""

from __future__ import annotations


def printable(text: object) -> str:
    """*text* with control, format, separator and unassigned characters escaped; plain spaces kept."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)
