"""Command-line scripts behind ``mot <command>``."""
