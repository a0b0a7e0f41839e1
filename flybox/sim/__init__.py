"""A synthetic microscope (micrographs, picks and CTF written over time) and ``flybox demo``."""
