"""Reading and writing of cryo-EM files: MRC, STAR, particle coordinates and CTF tables."""
