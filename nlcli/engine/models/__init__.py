"""Decoder and encoder models written in torch, and the registry from architectures to classes."""
