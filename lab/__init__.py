"""detnet.lab."""
