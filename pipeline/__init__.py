"""The staged build: spec, stages, validation, report, CLI."""
