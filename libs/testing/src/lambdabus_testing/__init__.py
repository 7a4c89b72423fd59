"""Test fixtures shared by the suites: real servers on ephemeral ports, ready by their own word."""
