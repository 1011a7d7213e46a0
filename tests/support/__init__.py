"""Test support: real servers, real databases, recorded stream histories."""
