"""The streaming service: watching, pairing, journal, scheduling, publishing."""
