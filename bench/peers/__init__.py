"""The peers the product is compared with, each run as its own process by the harness.

Each peer sets the Redis key `bench:ready` once it is set up, drains a fixed number of
events, and exits by itself at that count or at its time limit.
"""

READY_KEY = "bench:ready"
