"""Stage package: report."""
