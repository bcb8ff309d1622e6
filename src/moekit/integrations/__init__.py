"""Integrations with other libraries; each submodule imports its library only when it is imported itself.

``moekit.integrations.transformers`` (the ``moekit[hf]`` extra): expert-parallel transformers MoE models.
"""
