"""Results as text for people: the terminal output of each command (rich) and the markdown note.

The library (:mod:`moeprof.analysis`, :mod:`moeprof.generate`) computes and never prints; the
command line hands its results to the module here of the command's name.
"""
