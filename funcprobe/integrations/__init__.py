"""Integrations with training libraries (imported on demand: ``funcprobe.integrations.trl``)."""
