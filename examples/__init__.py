"""The seed's models trained for real, with and without bigmodel (see examples/README.md)."""
