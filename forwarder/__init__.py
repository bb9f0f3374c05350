"""jirafe-forwarder: forwards shop events from a Redis list to the Jirafe Event API v2."""

__version__ = "0.1.0"
