"""Stage package: split (subject-grouped k-fold)."""
