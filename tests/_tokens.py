"""Run tokens for tests: long enough for the handshake's 128-bit minimum (``check_token``)."""

TOKEN = b"lowcomm-test-token-0123456789abcdef"
# A second, different valid token (for wrong-token tests).
OTHER_TOKEN = b"lowcomm-other-token-fedcba9876543210"
