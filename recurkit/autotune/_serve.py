"""Entry point of the measuring process: ``python -m recurkit.autotune._serve``."""
import sys

from .worker import serve

serve(sys.stdin.buffer, sys.stdout.buffer)
