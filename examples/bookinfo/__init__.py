"""Bookinfo: our Python implementation of Istio's bookinfo sample (productpage, details,
reviews v1/v2/v3, ratings). See README.md."""
