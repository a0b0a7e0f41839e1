"""One micrograph through the chain, shared by the batch command and the service: the chain
(built and validated once), input discovery and name matching, the output layout and STAR rows,
the job a worker runs, and the worker pool.
"""
