"""Stage package: grid."""
