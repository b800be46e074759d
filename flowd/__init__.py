"""flowd: Redis streams → handlers → ClickHouse tables and streams, committed before ack."""

from flowd.config import Config, ConfigError, FlowConfig, load
from flowd.handler import Batch, Handler, Message, Outcome, Record, Rejection, record_handler

__all__ = [
    "Batch",
    "Config",
    "ConfigError",
    "FlowConfig",
    "Handler",
    "Message",
    "Outcome",
    "Record",
    "Rejection",
    "load",
    "record_handler",
]

__version__ = "0.1.0"
