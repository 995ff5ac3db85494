"""Stage 3: distill the compact student from the frozen teacher (method.md §5)."""
