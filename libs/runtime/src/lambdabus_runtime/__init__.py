"""The function runtime SDK: the HTTP server every function instance runs.

It is put on the PYTHONPATH of each instance (never installed into user environments) and
imports the standard library only, because its import time is paid at every cold start.
Functions import `Response` from here to choose a status or headers.
"""

from lambdabus_runtime.response import Response

__all__ = ["Response"]
