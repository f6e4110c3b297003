"""xnat2bids: keep a local BIDS dataset in sync with an XNAT archive (plan / apply / check)."""

__version__ = "0.1.0"
