"""Discovery and validation of processing steps (entry-point group ``flybox.processors``)."""
