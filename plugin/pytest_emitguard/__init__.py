"""pytest plugin for emitguard: fixtures, marker, fault injection, log watch and report.

pytest loads :mod:`pytest_emitguard.plugin` through the ``pytest11`` entry point; nothing acts
until a project requests an ``emitguard_*`` fixture, uses the ``emitguard`` marker or turns on
strict mode or the log watch in its configuration.
"""
