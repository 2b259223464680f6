"""Hostile-input tests: property-based (hypothesis) fuzzing of every portal RPC,
malformed and forged MQTT change events, and corrupted replica storage.

Each module drives real daemons (tests/harness.py); tests/fuzz/conftest.py
starts one shared stack for the package and checks, after every test, that no
daemon died or logged a traceback.
"""
