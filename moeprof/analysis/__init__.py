"""Reading, checking and analysing moeprof logs. Computes and returns; never prints.

reader.py, fastparse.py   the log as numpy chunks (streaming)
validate.py               ``moeprof validate``
analyze.py                ``moeprof analyze``: per layer and phase, contamination, comparison
plots.py                  ``moeprof plot``: matplotlib figures of an analysis, written as PNG
load_balance.py           pure statistics of per-expert counts (entropy, CV, Gini, JSD, ...)
coselection.py            experts picked together: lift, top pairs
accumulate.py             running sums of routes per (layer, phase), a chunk at a time
summary.py                the reported numbers of one stream, from its running sums
positions.py              which (request, layer, position) keys were seen, one bit each
contamination.py          warm-up/dummy batches and double logging: detection and exclusion
"""
