"""relaymail: a privacy-preserving SMTP relay for marketplace buyer-seller mail."""

__version__ = "0.1.0"
