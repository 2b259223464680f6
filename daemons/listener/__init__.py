"""The listener daemon: every change event appended to a durable audit log."""
