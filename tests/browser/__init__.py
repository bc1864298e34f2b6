"""Browser tests: the caller page in headless Chromium (pytest marker `browser`)."""
