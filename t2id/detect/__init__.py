"""Stage package: detect."""
