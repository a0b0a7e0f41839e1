"""Work (DESIGN.md §2, middle): the journal, the queue of ready units, the executor that
runs them, and the commit of their outputs.
"""
