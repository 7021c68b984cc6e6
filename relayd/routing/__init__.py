"""Routing: which smarthosts each message leaves through, and what a provider's reply means.

``match`` chooses a route per recipient and splits a message by route (pure); ``rules`` holds
the reply rules (the shipped provider rules as data) and matches a reply against them (pure).
"""
