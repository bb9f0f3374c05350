"""Local stand-in for the Jirafe Event API v2, for tests, the demo and benchmarks.

It serves every Event API path with the live server's validation and error format,
records what it accepted, and injects faults on demand. See docs/sandbox.md.
"""

from forwarder.sandbox.auth import TokenTable
from forwarder.sandbox.cli import add_sandbox_arguments, run_sandbox
from forwarder.sandbox.faults import FAULT_KINDS, ActiveFault, Fault, FaultSet
from forwarder.sandbox.samples import sample_event, sample_order
from forwarder.sandbox.server import DEFAULT_MAX_BODY_BYTES, Sandbox
from forwarder.sandbox.state import ReceivedEvent, RecordMode, RequestRecord, SandboxState

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "FAULT_KINDS",
    "ActiveFault",
    "Fault",
    "FaultSet",
    "ReceivedEvent",
    "RecordMode",
    "RequestRecord",
    "Sandbox",
    "SandboxState",
    "TokenTable",
    "add_sandbox_arguments",
    "run_sandbox",
    "sample_event",
    "sample_order",
]
