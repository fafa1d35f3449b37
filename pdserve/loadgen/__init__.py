"""`pdserve bench`: a serving load generator for pdserve, llama-server and a transformers baseline.

Modules: workloads (what is asked), arrivals (when), backend (whom, through one
interface), runner (sends the trace, records every token's arrival), stats
(percentiles, throughput, goodput), report (table, JSON, plot), cli (`pdserve bench`).
"""
