"""The package's base exception.

Every error the package raises for input it cannot use (a config key, a data, checkpoint or weights
file, an image, an output folder) derives from ``AttriMeterError`` as well as from the built-in
class it always had (ValueError, RuntimeError, OSError, ...), so ``except AttriMeterError`` catches
them all and existing ``except ValueError`` code keeps working. The messages name the file, key or
value and the fix.
"""


class AttriMeterError(Exception):
    """Base of the package's errors; the message names what is wrong and how to fix it."""
