"""The cluster: roles in separate processes talking over mutual TLS (DESIGN.md §2, §6)."""
