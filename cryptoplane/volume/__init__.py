"""LUKS2/LUKS1 encrypted volumes: the on-disk format, keyslots, and the sector data path."""
