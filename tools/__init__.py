"""Development tools of the project (not installed): custom import-linter contracts."""
