"""detnet.bench."""
