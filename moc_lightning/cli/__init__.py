"""The `moc` command line: composed configs and the jobs they start."""
