"""Stage package: lora."""
