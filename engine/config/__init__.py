"""Configuration: qmail's control files and qrelay's own named settings.

Config is read into immutable snapshots and swapped whole on reload; nothing
on a hot path reads a file.
"""
