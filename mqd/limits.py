"""Every server limit in one place (protocol.md §5), with unit-suffixed names.

The server advertises these in its HELLO answer so clients can size batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mqd.errors import ConfigError

MIB = 1024 * 1024
# A frame must hold one maximal message plus its headers and fields.
FRAME_OVERHEAD_BYTES = 64 * 1024


@dataclass(slots=True)
class Limits:
    message_bytes_max: int = 1 * MIB
    batch_messages_max: int = 1000
    receive_wait_ms_max: int = 20_000
    visibility_timeout_ms_max: int = 12 * 3600 * 1000
    delay_ms_max: int = 7 * 24 * 3600 * 1000
    requests_in_flight_max: int = 1024
    connections_max: int = 10_000
    attributes_max: int = 16
    queue_name_chars_max: int = 80
    handshake_timeout_ms: int = 10_000
    idle_timeout_ms: int = 300_000
    # Push subscriptions (protocol.md §4.18): open at once on one connection, and the
    # credits (messages it may push unacknowledged by a GRANT) one may hold.
    subscriptions_per_connection_max: int = 64
    subscription_credits_max: int = 10_000
    frame_timeout_ms: int = 30_000
    frame_bytes_per_s_min: int = 16_384

    @property
    def frame_bytes_max(self) -> int:
        return max(16 * MIB, self.message_bytes_max + FRAME_OVERHEAD_BYTES)

    def validate(self) -> None:
        bounds = {
            "message_bytes_max": (1, 16 * MIB),
            "batch_messages_max": (1, 10_000),
            "receive_wait_ms_max": (0, 20_000),
            "visibility_timeout_ms_max": (0, 12 * 3600 * 1000),
            "delay_ms_max": (0, 7 * 24 * 3600 * 1000),
            "requests_in_flight_max": (1, 65_536),
            "connections_max": (1, 1_000_000),
            "attributes_max": (0, 64),
            "queue_name_chars_max": (1, 80),
            "handshake_timeout_ms": (100, 600_000),
            "idle_timeout_ms": (1000, 86_400_000),
            "subscriptions_per_connection_max": (1, 65_536),
            "subscription_credits_max": (1, 1_000_000),
            "frame_timeout_ms": (100, 3_600_000),
            "frame_bytes_per_s_min": (0, 1 << 30),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(
                    f"limits.{name}: must be an integer from {low} to {high}, got {value!r}"
                )

    def as_wire(self) -> dict[str, int]:
        wire = dataclasses.asdict(self)
        wire["frame_bytes_max"] = self.frame_bytes_max
        return wire
