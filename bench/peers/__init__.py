"""Peer proxies the gateway is measured against."""
