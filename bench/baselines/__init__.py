"""Hand-written servers that turnout is measured against."""
