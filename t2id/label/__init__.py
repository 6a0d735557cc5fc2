"""Stage package: label."""
