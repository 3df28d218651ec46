"""The agent's own REST API on a unix socket, and the client the CLI uses."""
