"""A decoder that kills its process on files named 'poison' (importable by spawned workers)."""

import os

from florence_cli.decode import decode_or_reason


def crash_on_poison(path, spec):
    if "poison" in os.path.basename(path):
        os._exit(3)  # as a segfault in a native decoder would
    return decode_or_reason(path, spec)
