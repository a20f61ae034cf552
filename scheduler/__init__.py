"""Triggers: the beat schedule, dependency and composite canvas, reactive triggers."""
