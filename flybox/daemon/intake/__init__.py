"""Intake (DESIGN.md §2, first half): watch → complete → read → pair → ready units."""
