"""Attacks, each a small class with one entry point that returns typed results."""
