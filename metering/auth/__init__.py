"""Bearer-token auth: API keys (models, service, routes) and the principal."""
