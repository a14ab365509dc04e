"""serve_app package."""
