"""relay: a local SMTP smarthost that accepts mail in milliseconds and never loses it."""

__version__ = "0.1.0"
