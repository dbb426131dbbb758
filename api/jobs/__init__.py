"""Jobs: submit, read, list, cancel; their events, metrics and artifacts have their own packages."""
