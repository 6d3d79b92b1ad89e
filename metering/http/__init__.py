"""The HTTP server's connection handling: limits and timeouts uvicorn does not enforce."""
