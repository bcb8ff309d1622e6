"""Drop-in surfaces of other projects, thin layers over moekit's own API.

- :mod:`moekit.compat.deep_ep`: DeepEP's legacy ``deep_ep.Buffer`` (``import moekit.compat.deep_ep as deep_ep``).
"""
