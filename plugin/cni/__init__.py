"""The CNI plugin binary (stdlib only) and the agent side of CNI attachments."""
