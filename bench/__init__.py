"""Speed comparisons, each against its baseline in the same run: `python -m bench NAME [flags]`."""
