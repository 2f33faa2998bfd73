"""Running a child process that file permissions apply to, even when the tests run as root, or as another user."""

from __future__ import annotations

import os
import shutil


def without_root_powers() -> list[str]:
    """A command prefix under which permission bits apply, even when the tests run as root (CI does).

    Dropping the capabilities that let root ignore permissions keeps uid 0, so the child can still
    reach the repository wherever CI cloned it; a plain non-root user needs no prefix.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root's permission override for this test"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]


NOBODY = 65534  # the unprivileged user and group Debian and most distributions have


def as_another_user(uid: int = NOBODY) -> list[str]:
    """A command prefix under which the child runs as another, unprivileged user: a local attacker. Switching
    user needs root, as CI runs the suite."""
    assert os.geteuid() == 0, "running a child as another user needs root, as CI runs the suite"
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run a child as another user"
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
