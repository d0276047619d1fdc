"""The errors scalegen raises on purpose, in a leaf module every layer may import."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config key or a pairing of parts that cannot work, found before any compute; the message names the key."""
