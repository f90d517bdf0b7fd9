"""The in-process engine: node and broadcaster code wired in virtual time."""
