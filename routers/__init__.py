"""Routing decisions for model `green`: the trained router and cascade (tracked in issue 6).

The gateway reserves `green` and answers it with a clear error until a router is configured.
"""
