"""flowd: Redis streams → handlers → ClickHouse tables and streams, committed before ack."""

from flowd.core.columns import ABSENT, Columns
from flowd.core.config import Config, FlowConfig, load
from flowd.core.errors import ConfigError, ConfigurationError, DataError, FlowdError, TransientError
from flowd.plugin.handler import Batch, Handler, Message, Outcome, Record, Rejection, record_handler
from flowd.publish import InvalidRecord, PublishError, StreamFull, publish, publish_async

__all__ = [
    "ABSENT",
    "Batch",
    "Columns",
    "Config",
    "ConfigError",
    "ConfigurationError",
    "DataError",
    "FlowConfig",
    "FlowdError",
    "Handler",
    "InvalidRecord",
    "Message",
    "Outcome",
    "PublishError",
    "Record",
    "Rejection",
    "StreamFull",
    "TransientError",
    "load",
    "publish",
    "publish_async",
    "record_handler",
]

__version__ = "0.1.0"
