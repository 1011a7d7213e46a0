"""Generated from proto/third_party/ by scripts/genproto.py. Do not edit."""
