"""Reports: terminal (rich) and exports for other tools."""
