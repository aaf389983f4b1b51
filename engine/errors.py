"""The engine's exception tree.

One root, :class:`MigrationError`. Every error a user can see is one of these and
carries a one-line message that names what was wrong (received vs expected).

    MigrationError
    ├── ConfigError            bad parameters, URIs, sizes, images (the user's input)
    ├── ProtocolError          the bytes on the wire break the QEMU 7.2 format
    │   ├── RemoteProtocolError    ... and the peer sent them
    │   └── LocalProtocolError     ... and we were about to send them (a bug or bad call)
    ├── CompressionError       a (de)compressor failed or produced the wrong size
    ├── ChannelError           a channel process or its socket failed
    │   ├── ChannelClosed          the peer closed at a packet boundary (a clean end)
    │   ├── TruncatedError         the peer closed in the middle of a message
    │   └── TlsError               a TLS handshake, certificate or authorization check failed
    ├── MigrationTimeout       a deadline passed (handshake, sync, stall)
    ├── MigrationCancelled     the user cancelled (API cancel(), SIGINT, SIGTERM)
    └── SnapshotError          a snapshot file cannot be saved or restored
        ├── SnapshotFormatError    not a snapshot, or another format version (also a ConfigError)
        └── SnapshotCorruptError   truncated, incomplete or failing a checksum: never restored
"""

from __future__ import annotations


class MigrationError(Exception):
    """Root of every error the engine raises on purpose."""


class ConfigError(MigrationError):
    """Invalid parameters, URI, size string, RAM image or CLI arguments."""


class ProtocolError(MigrationError):
    """Bytes that do not follow the QEMU 7.2 migration format."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the format."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something that breaks the format."""


class CompressionError(MigrationError):
    """A compression method failed, or its output had the wrong size."""


class ChannelError(MigrationError):
    """A channel (process or socket) failed."""


class ChannelClosed(ChannelError):
    """The peer closed the connection on a message boundary."""


class TruncatedError(ChannelError):
    """The peer closed the connection in the middle of a message."""


class TlsError(ChannelError):
    """A TLS session could not be set up: the handshake, a certificate check or tls-authz failed."""


class MigrationTimeout(MigrationError):
    """A deadline passed while waiting for the peer or a channel."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled by the user."""


class SnapshotError(MigrationError):
    """A snapshot file cannot be saved or restored; the message is one line naming the file."""


class SnapshotFormatError(SnapshotError, ConfigError):
    """Not a snapshot file, or a snapshot of another format version."""


class SnapshotCorruptError(SnapshotError):
    """A snapshot file is truncated, incomplete or fails a checksum: never restored."""
