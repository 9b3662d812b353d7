"""pytest plugin for emitguard; fixtures arrive in a later release."""
