"""The module Hypercorn workers import (``gateway._asgi:app``).

The policy path and the admin ports arrive through the environment, set by ``serve``
in the master before the workers are spawned.
"""

from ._app import create_gateway_from_env
from ._gc import tune_garbage_collector
from ._server import prepare_worker_process

prepare_worker_process()
app = create_gateway_from_env()
tune_garbage_collector()
