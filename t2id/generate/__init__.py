"""Stage package: generate."""
