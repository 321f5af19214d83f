"""Benchmarks: each runs Isthmus and (where there is one) a peer in the same invocation."""
